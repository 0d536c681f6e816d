"""What `ray job submit --address ADDR -- python jobs/train_steerlm2.py --config CONFIG.yaml` runs: the stage
in steerray/stages/train_steerlm2.py, exactly as `python -m steerray.stages.train_steerlm2` does."""

from steerray.stages.train_steerlm2 import main

if __name__ == "__main__":
    main()
