"""What `ray job submit --address ADDR -- python jobs/bootstrap.py --config CONFIG.yaml` runs: the stage
in steerray/stages/bootstrap.py, exactly as `python -m steerray.stages.bootstrap` does."""

from steerray.stages.bootstrap import main

if __name__ == "__main__":
    main()
