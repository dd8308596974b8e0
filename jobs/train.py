"""Ray job entry point: exactly `stablerep-ray train ...` (same arguments, output and exit code).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/train.py configs/paper-vitb16-sd15.yaml \
        [--set KEY=VALUE ...] [--output-dir DIR] [--max-steps N]
"""

from _entry import run

if __name__ == "__main__":
    run("train")
