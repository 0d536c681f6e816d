"""What `ray job submit --address ADDR -- python jobs/train_reward.py --config CONFIG.yaml` runs: the stage
in steerray/stages/train_reward.py, exactly as `python -m steerray.stages.train_reward` does."""

from steerray.stages.train_reward import main

if __name__ == "__main__":
    main()
