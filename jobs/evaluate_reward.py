"""What `ray job submit --address ADDR -- python jobs/evaluate_reward.py --config CONFIG.yaml` runs: the stage
in steerray/stages/evaluate_reward.py, exactly as `python -m steerray.stages.evaluate_reward` does."""

from steerray.stages.evaluate_reward import main

if __name__ == "__main__":
    main()
