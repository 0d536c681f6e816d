"""What `ray job submit --address ADDR -- python jobs/steerlm2_data.py --config CONFIG.yaml` runs: the stage
in steerray/stages/steerlm2_data.py, exactly as `python -m steerray.stages.steerlm2_data` does."""

from steerray.stages.steerlm2_data import main

if __name__ == "__main__":
    main()
