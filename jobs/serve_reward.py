"""What `ray job submit --address ADDR -- python jobs/serve_reward.py --config CONFIG.yaml` runs: the stage
in steerray/stages/serve_reward.py, exactly as `python -m steerray.stages.serve_reward` does."""

from steerray.stages.serve_reward import main

if __name__ == "__main__":
    main()
