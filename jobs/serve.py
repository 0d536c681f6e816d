"""What `ray job submit --address ADDR -- python jobs/serve.py --config CONFIG.yaml` runs: the stage
in steerray/stages/serve.py, exactly as `python -m steerray.stages.serve` does."""

from steerray.stages.serve import main

if __name__ == "__main__":
    main()
