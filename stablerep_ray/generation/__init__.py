"""Generation: caption rows -> Ray Data actor pool of text-to-image backends -> rows of n images."""

from .backends import BACKENDS, generator_class, image_seed
from .stage import GeneratorActor, build_image_stream

__all__ = ["BACKENDS", "GeneratorActor", "build_image_stream", "generator_class", "image_seed"]
