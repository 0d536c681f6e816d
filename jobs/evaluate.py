"""What `ray job submit --address ADDR -- python jobs/evaluate.py --config CONFIG.yaml` runs: the stage
in steerray/stages/evaluate.py, exactly as `python -m steerray.stages.evaluate` does."""

from steerray.stages.evaluate import main

if __name__ == "__main__":
    main()
