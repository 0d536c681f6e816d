"""steerray: SteerLM alignment on Ray. See README.md; stages live in ``steerray.stages``."""

from steerray.ray_env import prepare_environment

# Ray reads its socket binding when it is first imported: set it before any steerray module imports Ray.
prepare_environment()
