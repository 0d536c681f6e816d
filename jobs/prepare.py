"""What `ray job submit --address ADDR -- python jobs/prepare.py --config CONFIG.yaml` runs: the stage
in steerray/stages/prepare.py, exactly as `python -m steerray.stages.prepare` does."""

from steerray.stages.prepare import main

if __name__ == "__main__":
    main()
