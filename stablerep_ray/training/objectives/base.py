"""What a training method is to the rest of the program.

An objective says how many images of each caption group it reads and how many encoder inputs it
makes of them (the stream and the batch arithmetic follow from that), which modules it trains, how it
turns a batch into encoder inputs and a loss, and what it keeps between steps. The train loop, the
planner's rate measurement and the GPU benchmark all run it through the one ``TrainStep``.

Objective modules import torch and the losses inside their methods: the config schema asks them about
stream shapes while validating, before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ...config import Config
    from ...stream import Batch

Forward = Callable[..., Any]
Augment = Callable[["torch.Tensor", "torch.Generator"], Any]


class Objective:
    """A training method. Subclasses set the class attributes and override ``loss``."""

    name: ClassVar[str]
    #: The weight set evaluation and export use by default: "model" (the trained network) or a name
    #: in ``extra_weights`` (SynCLR: its EMA teacher).
    eval_weights: ClassVar[str] = "model"
    #: True: a caption's m images are positives of each other (StableRep); False: one image per
    #: caption, whose augmented views are its only positives (SimCLR).
    caption_positives: ClassVar[bool] = True
    #: Augmented views of every drawn image.
    views_per_image: ClassVar[int] = 1

    # -- stream shape: asked at config validation ------------------------------------------------
    @classmethod
    def images_drawn_per_group(cls, config: Config) -> int:
        """Distinct generated images drawn from a caption's n per serve."""
        return config.stream.images_per_group if cls.caption_positives else 1

    @classmethod
    def inputs_per_group(cls, config: Config) -> int:
        """Encoder inputs per caption group in a batch."""
        return cls.images_drawn_per_group(config) * cls.views_per_image

    @classmethod
    def batch_unit(cls) -> str:
        """How one caption group's inputs are counted, for the batch-size error message."""
        if cls.caption_positives:
            return "stream.images_per_group" + (f" x {cls.views_per_image} views" if cls.views_per_image > 1 else "")
        return f"{cls.views_per_image} views"

    @classmethod
    def relative_cost(cls, config: Config) -> float:
        """Encoder compute per input relative to one forward + backward at the model's input size (the
        planner's estimate when nothing was measured; a measured rate runs the step itself)."""
        return 1.0

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Raise ``ValueError`` naming the key and the fix when the config cannot train this objective."""
        m = config.stream.images_per_group
        if cls.caption_positives and m < 2:
            raise ValueError(
                f"stream.images_per_group: the '{cls.name}' objective needs at least 2 images per "
                f"caption to form positives (got {m}); set it to 2 or more, or use train.objective=simclr"
            )

    # -- run time ----------------------------------------------------------------------------------
    def __init__(self, config: Config):
        self.config = config

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of ``build_model`` beyond the config; saved with the model so it can be rebuilt."""
        return {}

    def setup(self, model: torch.nn.Module) -> None:
        """Called once the model is built, before a checkpoint is restored (SynCLR copies its teacher)."""

    def build_augment(self) -> Augment:
        """The on-device augmentation ``views`` applies to the batch's images."""
        from ...augment import BatchAugment

        return BatchAugment(self.config.augment, self.config.model.image_size)

    def extra_weights(self) -> dict[str, torch.nn.Module]:
        """Weight sets of the model's architecture kept beside it in model.pt (restored with it)."""
        return {}

    def eval_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """What online evaluation probes: metric prefix -> module with ``.features``."""
        return {"eval": model}

    def views(self, images: torch.Tensor, caption_ids: torch.Tensor, augment: Augment,
              generator: torch.Generator) -> tuple[Any, torch.Tensor]:
        """Encoder inputs and their labels from a batch's uint8 images (N, S, S, 3) on the device
        (the inputs are a tensor here; ``loss`` is the only reader, so an objective may use any type).

        The batch is caption-major (each caption's images together); the inputs come out view-major:
        ``head_chunks`` consecutive slices, each holding one image (or view) of every caption, so the
        projection head's BatchNorm never sees two positives in one batch (as the authors' code).
        """
        import torch

        images, caption_ids = self.image_major(images, caption_ids)
        views = [augment(images, generator) for _ in range(self.views_per_image)]
        return torch.cat(views), caption_ids.repeat(self.views_per_image)

    def image_major(self, images: torch.Tensor, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reorder a caption-major batch so that slice j holds image j of every caption."""
        import torch

        drawn = self.images_drawn_per_group(self.config)
        order = torch.arange(len(caption_ids), device=caption_ids.device).view(-1, drawn).T.reshape(-1)
        return images[order], caption_ids[order]

    @property
    def head_chunks(self) -> int:
        """Slices of the inputs that the projection head normalises separately (see ``views``)."""
        return self.inputs_per_group(self.config)

    def loss(self, forward: Forward, model: torch.nn.Module, inputs: Any, labels: torch.Tensor,
             batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and the detached terms to log (``loss/...``).

        ``forward`` runs the (possibly DDP-wrapped) image model; ``model`` is the bare module, for
        the parts that live beside the image model (a text tower).
        """
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after every optimiser step (for example to update a teacher)."""

    def state_dict(self) -> dict[str, Any]:
        """State beyond the model and optimiser that a resumed run needs."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
