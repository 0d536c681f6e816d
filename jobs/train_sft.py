"""What `ray job submit --address ADDR -- python jobs/train_sft.py --config CONFIG.yaml` runs: the stage
in steerray/stages/train_sft.py, exactly as `python -m steerray.stages.train_sft` does."""

from steerray.stages.train_sft import main

if __name__ == "__main__":
    main()
