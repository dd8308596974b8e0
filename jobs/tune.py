"""Ray job entry point: exactly `stablerep-ray tune ...` (same arguments, output and exit code).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py CONFIG \
        [--set KEY=VALUE ...] [--output-dir DIR] [--resume]
"""

from _entry import run

if __name__ == "__main__":
    run("tune")
