"""Ray job entry point: exactly `stablerep-ray eval ...` (same arguments, output and exit code).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/eval.py --checkpoint DIR|URI --data TRAIN[:TEST] \
        [--method knn|linear|both] [--num-actors A] [--num-gpus G]     # all options: stablerep-ray eval -h
"""

from _entry import run

if __name__ == "__main__":
    run("eval")
