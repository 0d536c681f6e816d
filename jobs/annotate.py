"""What `ray job submit --address ADDR -- python jobs/annotate.py --config CONFIG.yaml` runs: the stage
in steerray/stages/annotate.py, exactly as `python -m steerray.stages.annotate` does."""

from steerray.stages.annotate import main

if __name__ == "__main__":
    main()
