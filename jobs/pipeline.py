"""What `ray job submit --address ADDR -- python jobs/pipeline.py --config CONFIG.yaml` runs: the stage
in steerray/stages/pipeline.py, exactly as `python -m steerray.stages.pipeline` does."""

from steerray.stages.pipeline import main

if __name__ == "__main__":
    main()
