"""``stablerep-ray export``: a checkpoint's image encoder as safetensors that plain timm loads,
without this project installed.

Two layouts, one content (weights, how timm rebuilds the architecture, and the preprocessing
training used):

- ``hf``: a directory as on the Hugging Face Hub, ``config.json`` + ``model.safetensors``:
  ``timm.create_model("local-dir:OUT", pretrained=True)``, or ``"hf-hub:<you>/<repo>"`` once uploaded.
- ``timm``: one ``.safetensors`` file with the config in its metadata, for timm versions without
  ``local-dir:`` (``load_snippet`` is the ``create_model`` call for either).

The config is written by timm's own ``save_config_for_hf``, so timm's reader agrees with it. Its
``pretrained_cfg`` carries the training normalisation, which for most ViTs differs from timm's
defaults for the architecture name (``preprocessing_warning``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from ..config import ConfigError
from ..storage import replaced_atomically

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSING = ("mean", "std", "crop_pct", "interpolation")
# timm metadata that describes the architecture's own pretrained weights, not these
NOT_OURS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


def timm_config(encoder, config) -> dict:
    """The timm ``config.json`` of ``encoder``: architecture, model_args, and a pretrained_cfg whose
    preprocessing is what training and evaluation used (``augment.batch``)."""
    from timm.models._hub import save_config_for_hf

    from ..augment.batch import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

    size = config.model.image_size
    data = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": EVAL_CROP_PCT,
            "interpolation": "bilinear", "input_size": (3, size, size)}  # eval_transform: bilinear resize
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(encoder, f"{tmp}/{CONFIG_FILE}", data_config=data)
        cfg = json.loads(Path(tmp, CONFIG_FILE).read_text())
    for key in NOT_OURS:
        cfg["pretrained_cfg"].pop(key, None)
    cfg["stablerep_ray"] = {"run": config.name, "objective": config.train.objective}
    return cfg


def _text(value) -> str:
    return str(tuple(value)) if isinstance(value, list | tuple) else str(value)


def preprocessing_warning(cfg: dict) -> str | None:
    """A line saying how timm's defaults for the architecture name differ from the exported
    preprocessing (None when they agree or timm has no defaults for it)."""
    from timm.models import get_pretrained_cfg

    default = get_pretrained_cfg(cfg["architecture"])
    if default is None:
        return None
    ours = {k: _text(cfg["pretrained_cfg"][k]) for k in PREPROCESSING}
    theirs = {k: _text(getattr(default, k)) for k in PREPROCESSING}
    if ours == theirs:
        return None

    def show(values: dict) -> str:
        return ", ".join(f"{k} {values[k]}" for k in PREPROCESSING)

    return (f"timm's default preprocessing for {cfg['architecture']} ({show(theirs)}) differs from what training "
            f"used ({show(ours)}); the export carries the training values: take them from the loaded model "
            f"(timm.data.resolve_data_config({{}}, model=model)), not from the architecture name")


def output_format(out: str | os.PathLike, fmt: str | None = None) -> str:
    """The layout to write: ``fmt`` as asked, else by the name (``*.safetensors``: one file, timm;
    anything else: a directory, hf)."""
    return fmt or ("timm" if Path(out).suffix == ".safetensors" else "hf")


def _check_output(out: Path, fmt: str) -> None:
    if fmt == "timm":
        if out.suffix != ".safetensors" or out.is_dir():
            raise ConfigError(f"export OUT {str(out)!r}: --format timm writes one file; name it *.safetensors "
                              f"(timm reads safetensors by that suffix)")
    elif out.suffix == ".safetensors":
        raise ConfigError(f"export OUT {str(out)!r}: --format hf writes a directory, not a *.safetensors file; "
                          f"drop --format hf to write one file, or name a directory")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"export OUT {str(out)!r}: is a file; --format hf writes a directory, pass a directory path")


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike,
                   fmt: Literal["hf", "timm"] | None = None, weights: str | None = None) -> dict:
    """Write the encoder of ``checkpoint`` (weight set ``weights``; None: the one evaluation uses) to
    ``out`` in layout ``fmt`` (None: by ``out``'s name, see ``output_format``); returns the timm
    config written with it."""
    from safetensors.torch import save_file

    from .io import load_checked_model

    out = Path(out).expanduser()
    fmt = output_format(out, fmt)
    _check_output(out, fmt)
    model, config = load_checked_model(checkpoint, weights)
    if config.model.stem != "patch":
        raise ConfigError(f"export {str(checkpoint)!r}: model.stem={config.model.stem} is not a timm "
                          f"architecture, so timm could not rebuild it; load the checkpoint with "
                          f"stablerep_ray.models.load_model instead")
    encoder = model.encoder
    cfg = timm_config(encoder, config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # Each file is written beside its place and renamed over it: an interrupted export (Ctrl-C, a full
    # disk) leaves the files it would replace, or none, never a truncated safetensors file.
    if fmt == "hf":
        out.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(out / WEIGHTS_FILE) as weights_tmp, replaced_atomically(out / CONFIG_FILE) as cfg_tmp:
            save_file(tensors, weights_tmp, metadata={"format": "pt"})
            cfg_tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", **{k: json.dumps(cfg[k]) for k in ("architecture", "model_args", "pretrained_cfg")}}
        with replaced_atomically(out) as tmp:
            save_file(tensors, tmp, metadata=meta)
    return cfg


def load_snippet(out: str | os.PathLike, fmt: str) -> str:
    """Python that loads the export with plain timm (the README shows the same)."""
    path = str(Path(out).expanduser().resolve())
    if fmt == "hf":
        return f'import timm\nmodel = timm.create_model("local-dir:{path}", pretrained=True).eval()'
    return (
        "import json, timm\nfrom safetensors import safe_open\n"
        f'meta = {{k: json.loads(v) for k, v in safe_open("{path}", "pt").metadata().items() if k != "format"}}\n'
        'model = timm.create_model(meta["architecture"], pretrained=True, **meta["model_args"],\n'
        f'                          pretrained_cfg_overlay={{**meta["pretrained_cfg"], "file": "{path}"}}).eval()'
    )
