"""SAM-2 backend: build the model from a local checkpoint, encode slices once, decode many prompts from features.

The pseudo-label refresh encodes every unlabeled slice once (see ``cache.py``) and later decodes box/point prompts
from the stored features, so encoding (seconds per slice on a CPU) is paid once and decoding (milliseconds per prompt)
at every refresh. SAM-2's image predictor has no public API for precomputed features; ``predict_from_features`` is
the one place that touches its private state, and it is tested against ``set_image`` + ``predict``.

Nothing here downloads anything: the checkpoint is a local file given as an argument or in the environment variable
``nnUNet_sss_sam2_checkpoint``. ``sam2`` is imported lazily, because importing it initialises Hydra globally.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENV_CHECKPOINT = "nnUNet_sss_sam2_checkpoint"
ENV_CONFIG = "nnUNet_sss_sam2_config"
NO_SAM_TRAINER = "nnUNetTrainerSSS_noSAM"
DEFAULT_IMAGE_SIZE = 1024
WINDOW_PERCENTILES = (0.5, 99.5)

# (family in the file name, size word in the file name) -> packaged Hydra config name.
_SIZE_SHORT = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l", "t": "t", "s": "s", "b+": "b+", "l": "l"}
_NAME_RE = re.compile(r"(sam2\.1|sam2)_hiera_(tiny|small|base_plus|large|b\+|t|s|l)(?![a-z])")
# Image encoder trunk (patch embedding width, number of Hiera blocks) -> size, for checkpoints with other names.
_TRUNK_TO_SIZE = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}


class SAM2CheckpointError(RuntimeError):
    """The SAM-2 checkpoint or config cannot be used; the message says what to set, or how to train without SAM-2."""


def _advice() -> str:
    return (f"Set {ENV_CHECKPOINT} to a local SAM-2 checkpoint file (e.g. sam2.1_hiera_tiny.pt, downloaded by you "
            f"beforehand: nothing is downloaded at run time), or train without SAM-2 with -tr {NO_SAM_TRAINER}.")


def _hydra_config(family: str, size: str) -> str:
    return f"configs/{family}/{family}_hiera_{_SIZE_SHORT[size]}.yaml"


def config_from_checkpoint_name(path: str | Path) -> str | None:
    """Packaged Hydra config for an official checkpoint name (``sam2.1_hiera_tiny.pt`` ...), or None if unknown."""
    m = _NAME_RE.search(Path(path).name.lower().replace("-", "_"))
    return _hydra_config(m.group(1), m.group(2)) if m else None


def config_from_state_dict(state_dict: Mapping[str, Any]) -> str | None:
    """Infer the config from the weights: trunk width + block count give the size, SAM-2.1-only keys the family."""
    w = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if w is None:
        return None
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    size = _TRUNK_TO_SIZE.get((int(w.shape[0]), len(blocks)))
    if size is None:
        return None
    family = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    return _hydra_config(family, size)


def normalize_config_name(name: str) -> str:
    """Accept ``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2.1_hiera_t(.yaml)`` or ``sam2.1_hiera_tiny``."""
    name = name.strip()
    if "/" in name:
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    m = _NAME_RE.fullmatch(stem.lower().replace("-", "_"))
    return _hydra_config(m.group(1), m.group(2)) if m else name


def window_bounds(array: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Per-channel (lo, hi) intensity window of a (C, ...) array: the 0.5/99.5 percentiles ignore outlier voxels."""
    a = np.asarray(array, dtype=np.float32)
    flat = a.reshape(a.shape[0], -1)
    return np.stack([np.percentile(c, percentiles) for c in flat]).astype(np.float32)


def to_sam_image(image: np.ndarray, bounds: np.ndarray | None = None,
                 percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Medical slice (Y, X) or (C, Y, X) -> SAM's RGB input (Y, X, 3) uint8.

    SAM was trained on 8-bit RGB photographs; nnU-Net-normalised intensities are unbounded floats. Each channel is
    windowed to [lo, hi] -> [0, 255], with ``bounds`` (C, 2) if given (the cache passes per-case bounds so all slices
    of a volume share one window) or else the slice's own 0.5/99.5 percentiles. A constant channel becomes 0.
    Channels: 1 -> replicated to 3; 2 -> (c0, c1, mean of both); 3 -> as is; more than 3 -> the first three.
    uint8 because SAM-2's ``ToTensor`` scales uint8 by 1/255 but passes floats through unscaled.
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"to_sam_image expects (Y, X) or (C, Y, X), got shape {a.shape}")
    a = a[:3]
    b = window_bounds(a, percentiles) if bounds is None else np.asarray(bounds, dtype=np.float32)[: a.shape[0]]
    if b.shape != (a.shape[0], 2):
        raise ValueError(f"bounds must have shape (C, 2) = ({a.shape[0]}, 2), got {b.shape}")
    lo, hi = b[:, 0, None, None], b[:, 1, None, None]
    width = hi - lo
    scaled = np.where(width > 0, (np.clip(a, lo, hi) - lo) / np.where(width > 0, width, 1) * 255.0, 0.0)
    if scaled.shape[0] == 1:
        scaled = np.repeat(scaled, 3, axis=0)
    elif scaled.shape[0] == 2:
        scaled = np.concatenate([scaled, scaled.mean(0, keepdims=True)], axis=0)
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8).transpose(1, 2, 0))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) numpy image (see to_sam_image), got "
                         f"{getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8 and (image.min() < 0 or image.max() > 1.0 + 1e-6):
        # SAM-2's ToTensor leaves floats unscaled: a float image in [0, 255] would be silently wrong.
        raise ValueError("a float image must lie in [0, 1]; use uint8 for [0, 255] (to_sam_image returns uint8)")


def build_video_predictor(image_model: torch.nn.Module, config_name: str, image_size: int,
                          device: str | torch.device = "cpu") -> Any:
    """``sam2.build_sam.build_sam2_video_predictor`` for ``config_name`` at ``image_size``, with the weights of an
    already loaded image model (same SAM2Base parameters: the checkpoint is not read again). Hole filling is off:
    it needs sam2's CUDA extension, which a ``SAM2_BUILD_CUDA=0`` install lacks (sam2 would warn and skip it)."""
    from sam2.build_sam import build_sam2_video_predictor

    video = build_sam2_video_predictor(config_name, None, device="cpu",
                                       hydra_overrides_extra=[f"++model.image_size={int(image_size)}"])
    video.load_state_dict(image_model.state_dict(), strict=True)
    video.fill_hole_area = 0
    return video.to(torch.device(device)).eval()


class SAM2Backend:
    """SAM-2 image model + predictor built from a local checkpoint, on the caller's device.

    ``checkpoint``: path, or None to read ``nnUNet_sss_sam2_checkpoint``. ``config``: Hydra config name, or None to
    read ``nnUNet_sss_sam2_config``, then to derive it from the file name (official names), then from the weights.
    ``image_size``: SAM input size (1024 as trained; smaller is faster and coarser).
    """

    def __init__(self, checkpoint: str | Path | None = None, config: str | None = None,
                 image_size: int = DEFAULT_IMAGE_SIZE, device: str | torch.device = "cpu") -> None:
        if image_size < 64 or image_size % 32:
            raise ValueError(f"SAM image size must be a multiple of 32 and >= 64, got {image_size}")
        ckpt = checkpoint if checkpoint is not None else os.environ.get(ENV_CHECKPOINT, "").strip()
        if not ckpt:
            raise SAM2CheckpointError(f"No SAM-2 checkpoint given: {ENV_CHECKPOINT} is not set. {_advice()}")
        path = Path(ckpt).expanduser()
        source = "the checkpoint argument" if checkpoint is not None else ENV_CHECKPOINT
        if path.is_dir():
            raise SAM2CheckpointError(f"SAM-2 checkpoint {path} (from {source}) is a directory, not a checkpoint file: "
                                      f"give the path of the .pt file inside it. {_advice()}")
        if not path.is_file():
            raise SAM2CheckpointError(f"SAM-2 checkpoint {path} does not exist (from {source}). {_advice()}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated / non-torch / pickled-object files
            raise SAM2CheckpointError(
                f"SAM-2 checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}). The file is corrupt, "
                f"truncated or not a torch checkpoint; download it again. {_advice()}") from e
        if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
            state_dict = loaded["model"]
        elif isinstance(loaded, Mapping) and any(str(k).startswith("image_encoder.") for k in loaded):
            state_dict = loaded
        else:
            raise SAM2CheckpointError(
                f"SAM-2 checkpoint {path} holds no SAM-2 weights (expected {{'model': state_dict}} as in the official "
                f"checkpoints). {_advice()}")

        override = config if config is not None else os.environ.get(ENV_CONFIG, "").strip() or None
        inferred = config_from_state_dict(state_dict)
        if override:
            config_name = normalize_config_name(override)
        else:
            config_name = config_from_checkpoint_name(path) or inferred
        if config_name is None:
            raise SAM2CheckpointError(
                f"Cannot tell the SAM-2 config of {path}: its name is not an official one (sam2.1_hiera_tiny.pt ...) "
                f"and its weights match no packaged config. Give the config with {ENV_CONFIG} (or config=), e.g. "
                f"configs/sam2.1/sam2.1_hiera_t.yaml. {_advice()}")

        self.checkpoint_path = path.resolve()
        self.config_name = config_name
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.model = self._build(state_dict, inferred)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.predictor = SAM2ImagePredictor(self.model)
        s = self.image_size
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

    def _build(self, state_dict: Mapping[str, Any], inferred: str | None) -> torch.nn.Module:
        """Same steps as sam2's ``build_sam2(cfg, ckpt)`` (strict load, eval), with the checkpoint read only once."""
        from hydra.errors import HydraException
        from sam2.build_sam import build_sam2

        try:
            model = build_sam2(self.config_name, None, device="cpu",
                               hydra_overrides_extra=[f"++model.image_size={self.image_size}"])
        except HydraException as e:
            raise SAM2CheckpointError(
                f"SAM-2 config '{self.config_name}' is unknown to sam2 ({str(e).splitlines()[0][:200]}). Use a "
                f"packaged name such as configs/sam2.1/sam2.1_hiera_t.yaml in {ENV_CONFIG}. {_advice()}") from e
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            hint = (f" Its weights look like {inferred}: set {ENV_CONFIG}={inferred}."
                    if inferred and inferred != self.config_name else "")
            detail = " ".join(str(e).split())[:300]
            raise SAM2CheckpointError(
                f"SAM-2 config '{self.config_name}' does not match checkpoint {self.checkpoint_path} "
                f"(missing/unexpected/mis-shaped weights: {detail} ...).{hint} {_advice()}") from e
        return model.to(self.device).eval()

    def video_predictor(self) -> Any:
        """SAM-2's video predictor (memory attention across the slices of a volume) with this backend's weights,
        built on first use; PCSW's component mode propagates key-slice prompts with it (``propagation.py``)."""
        if getattr(self, "_video_predictor", None) is None:
            self._video_predictor = build_video_predictor(self.model, self.config_name, self.image_size, self.device)
        return self._video_predictor

    # --- image side -------------------------------------------------------------------------------------------
    to_sam_image = staticmethod(to_sam_image)

    @torch.no_grad()
    def encode(self, image_hw3: np.ndarray) -> dict[str, Any]:
        """Image encoder features of one (H, W, 3) image: ``image_embed`` (1, 256, S/16, S/16) and
        ``high_res_feats`` [(1, 32, S/4, S/4), (1, 64, S/8, S/8)], on the backend's device."""
        _check_image(image_hw3)
        p = self.predictor
        try:
            p.set_image(image_hw3)
            f = p._features
            return {"image_embed": f["image_embed"], "high_res_feats": list(f["high_res_feats"])}
        finally:
            p.reset_predictor()

    @torch.no_grad()
    def encode_batch(self, images: Sequence[np.ndarray]) -> dict[str, Any]:
        """Like ``encode`` for several images in one encoder pass (faster on a GPU); leading dim B."""
        for im in images:
            _check_image(im)
        p = self.predictor
        try:
            p.set_image_batch(list(images))
            f = p._features
            return {"image_embed": f["image_embed"], "high_res_feats": list(f["high_res_feats"])}
        finally:
            p.reset_predictor()

    # --- prompt side ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_from_features(self, features: Mapping[str, Any], orig_hw: tuple[int, int],
                              boxes: np.ndarray | None = None, point_coords: np.ndarray | None = None,
                              point_labels: np.ndarray | None = None,
                              multimask_output: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Decode N prompts on one slice from its features in ONE batched decoder call.

        Prompts are in the original slice's pixel coordinates, x = column, y = row: ``boxes`` (N, 4) as
        x0, y0, x1, y1; ``point_coords`` (N, K, 2) as x, y with ``point_labels`` (N, K) (1 = foreground,
        0 = background); (4,) / (K, 2) mean one prompt. Boxes and points together must have the same N.
        sam2 scales them to the SAM frame itself (``normalize_coords=True``: x * S / W, y * S / H in
        ``SAM2Transforms.transform_coords``) and resizes masks back to ``orig_hw`` (H, W).
        Returns masks bool (N, H, W) and predicted IoU scores (N,); with ``multimask_output`` the best-scoring
        of SAM's three masks per prompt.
        """
        if boxes is None and point_coords is None:
            raise ValueError("predict_from_features needs boxes and/or point_coords")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together")
        n = None
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            n = boxes.shape[0]
        if point_coords is not None:
            point_coords = np.asarray(point_coords, dtype=np.float32)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim == 2:
                point_coords, point_labels = point_coords[None], point_labels.reshape(1, -1)
            if point_coords.ndim != 3 or point_coords.shape[2] != 2 or point_labels.shape != point_coords.shape[:2]:
                raise ValueError(f"point_coords must be (N, K, 2) with point_labels (N, K), got "
                                 f"{point_coords.shape} and {point_labels.shape}")
            if n is not None and point_coords.shape[0] != n:
                raise ValueError(f"{n} boxes but {point_coords.shape[0]} point prompts")
            n = point_coords.shape[0]
        if n == 0:
            h, w = orig_hw
            return np.zeros((0, h, w), dtype=bool), np.zeros((0,), dtype=np.float32)

        emb = features["image_embed"]
        want = self.image_size // 16
        if emb.ndim != 4 or emb.shape[0] != 1 or tuple(emb.shape[-2:]) != (want, want):
            raise ValueError(f"image_embed of shape {tuple(emb.shape)} does not fit SAM image size {self.image_size} "
                             f"(expected (1, C, {want}, {want})): features from another image size or a batch?")
        p = self.predictor
        p.reset_predictor()
        # Private predictor state, exactly what set_image() leaves behind (sam2 1.1.0, sam2_image_predictor.py).
        p._features = {
            "image_embed": emb.to(self.device, torch.float32),
            "high_res_feats": [f.to(self.device, torch.float32) for f in features["high_res_feats"]],
        }
        p._orig_hw = [(int(orig_hw[0]), int(orig_hw[1]))]
        p._is_image_set = True
        p._is_batch = False
        try:
            masks, scores, _ = p.predict(point_coords=point_coords, point_labels=point_labels, box=boxes,
                                         multimask_output=multimask_output, normalize_coords=True)
        finally:
            p.reset_predictor()
        c = 3 if multimask_output else 1
        masks = masks.reshape(n, c, *masks.shape[-2:])
        scores = scores.reshape(n, c)
        best = scores.argmax(1) if multimask_output else np.zeros(n, dtype=int)
        idx = np.arange(n)
        return masks[idx, best] > 0, scores[idx, best].astype(np.float32)
