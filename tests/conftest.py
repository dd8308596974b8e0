import os

# Before any test imports ray: see stablerep_ray/__init__.py.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
