"""bench.gpu --split runs only on a GPU machine, lent rarely: its config must be right before it gets one."""

import pytest

from bench.gpu_split import split_overrides
from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.runtime import check_fits
from tests.repo import CONFIGS


@pytest.mark.parametrize("smoke", [False, True])
def test_split_is_the_paper_config_on_one_shared_gpu(smoke):
    paper = load_config(CONFIGS / "paper-vitb16-sd15.yaml")
    config = load_config(CONFIGS / "paper-vitb16-sd15.yaml", split_overrides(smoke))
    g, t = config.generator, config.train
    assert (t.num_workers, g.num_actors, config.stream.reuse, config.captions_per_worker_step) == (1, 1, 1, 4)
    assert (g.images_per_caption, config.group_size) == (paper.generator.images_per_caption, paper.group_size)
    gpus = 0 if smoke else 1
    if not smoke:  # the paper's generator and model; each side half of the one GPU
        assert (g.model.endswith("sd15-random"), g.steps, g.resolution, g.guidance_scale, g.dtype) == (
            True, paper.generator.steps, paper.generator.resolution, paper.generator.guidance_scale, "bf16")
        assert (config.model, t.precision) == (paper.model, "bf16")
        assert (g.num_gpus_per_actor, t.use_gpu, t.gpus_per_worker) == (0.5, True, 0.5)
    check_fits(config, cpus=config.cluster.num_cpus, gpus=gpus, where="the benchmark's Ray")
    with pytest.raises(ConfigError, match="GPUs"):
        check_fits(config.model_copy(update={"train": t.model_copy(update={"use_gpu": True, "gpus_per_worker": 1.0})}),
                   cpus=config.cluster.num_cpus, gpus=gpus, where="the benchmark's Ray")
