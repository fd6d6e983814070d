"""SAM-2 video propagation of PCSW key-slice prompts through a volume, from cached image features.

PCSW's component mode (``pcsw.generate_component_prompts``) prompts each kept 3D component once, on its
largest-area slice. Here SAM-2's video predictor treats the slices of the volume as frames: the key slice is the
conditioning frame, and memory attention carries the object to the component's other slices, forward and then
backward from the key slice. Each component is tracked on its own (the predictor loops over objects one by one
anyway), so components of different classes never share a memory bank.

Features come from the embedding cache, not from a second encoder pass. ``SAM2VideoPredictor._get_image_feature``
looks a frame up in ``inference_state["cached_features"]`` (frame -> (image, backbone_out)) before encoding it, and
only replaces that dict on a miss, so injecting every needed frame up front means the image encoder never runs.
The cache holds what ``SAM2ImagePredictor.set_image`` keeps, from which the backbone output is rebuilt exactly:
``backbone_fpn`` = [high_res_feats[0], high_res_feats[1], image_embed - no_mem_embed] (the image predictor adds
``no_mem_embed`` to the lowest-resolution level; the video predictor adds it itself on conditioning frames), and
``vision_pos_enc`` from the neck's sine position encoding, which depends only on the feature map's shape. The
inference state is built here without ``init_state`` (which only accepts a JPEG folder or an MP4 file and encodes
frame 0); its keys are tested against ``init_state``'s. Both rely on sam2 1.1.0 internals and are tested there.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nnunetv2_sss.sam.pcsw import ComponentPrompt

FeaturesFn = Callable[[int], Mapping[str, Any]]  # slice index -> {"image_embed", "high_res_feats"} (cache layout)


class _NoFrameImages:
    """Stands in for the decoded video frames: every frame's features are injected, so none is ever read."""

    def __init__(self, num_frames: int) -> None:
        self.num_frames = num_frames

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, frame_idx: int) -> torch.Tensor:
        raise KeyError(f"SAM-2 asked for the image of slice {frame_idx}, whose features were not injected; "
                       f"inject_features must cover every slice a component spans")


def new_inference_state(num_frames: int, orig_hw: tuple[int, int], device: torch.device | str) -> dict[str, Any]:
    """An empty SAM-2 video inference state for a volume of ``num_frames`` slices of size ``orig_hw`` (H, W), as
    ``SAM2VideoPredictor.init_state`` makes it (same keys), but without frames on disk and without encoding any."""
    device = torch.device(device)
    return {
        "images": _NoFrameImages(num_frames),
        "num_frames": int(num_frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": int(orig_hw[0]),
        "video_width": int(orig_hw[1]),
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


@torch.no_grad()
def backbone_out_from_features(model: Any, features: Mapping[str, Any]) -> dict[str, Any]:
    """The per-frame backbone output of ``model.forward_image`` rebuilt from image-predictor features (the cache's
    ``image_embed`` (1, C, S/16, S/16) and ``high_res_feats``), in fp32 on the model's device."""
    device = model.device
    emb = features["image_embed"].to(device, torch.float32)
    high = [f.to(device, torch.float32) for f in features["high_res_feats"]]
    if emb.ndim != 4 or emb.shape[0] != 1 or len(high) != 2:
        raise ValueError(f"expected one slice's features (image_embed (1, C, h, w) and two high_res_feats), got "
                         f"image_embed {tuple(emb.shape)} and {len(high)} high_res_feats")
    if model.directly_add_no_mem_embed:
        emb = emb - model.no_mem_embed.reshape(1, -1, 1, 1)
    fpn = [*high, emb]
    pos_enc = model.image_encoder.neck.position_encoding
    return {"vision_features": emb, "vision_pos_enc": [pos_enc(f).to(f.dtype) for f in fpn], "backbone_fpn": fpn}


def inject_features(model: Any, state: dict[str, Any], frames: Sequence[int], features_of: FeaturesFn) -> None:
    """Put the backbone output of every frame in ``frames`` into the state's feature cache (see module doc)."""
    placeholder = torch.zeros((1, 3, 1, 1), device=model.device)  # the "image" half of the entry is never read
    for z in frames:
        state["cached_features"][int(z)] = (placeholder, backbone_out_from_features(model, features_of(int(z))))


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """sam2 draws a tqdm bar per propagation call (two per component): keep stderr free of them, pass the rest."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield
    rest = [ln for ln in buf.getvalue().replace("\r", "\n").splitlines() if ln and "propagate in video" not in ln]
    if rest:
        print("\n".join(rest), file=sys.stderr)


@torch.no_grad()
def propagate_components(predictor: Any, components: Sequence[ComponentPrompt], num_slices: int,
                         orig_hw: tuple[int, int], features_of: FeaturesFn | None = None,
                         state: dict[str, Any] | None = None) -> list[np.ndarray]:
    """SAM-2 mask logits of every component over its own slices: a list of (z1 - z0, H, W) float32 arrays, one
    per component (``z_range`` = [z0, z1)), logits > 0 = inside.

    ``features_of(z)`` gives slice z's cached features (``cache.load_case_features``); pass a ready ``state``
    instead (e.g. with ``state["images"]`` holding SAM-normalised frames) to let SAM-2 encode the slices itself.
    Prompts are in slice pixel coordinates (x = column, y = row, box x1/y1 exclusive); sam2 scales them by
    S / W and S / H (``normalize_coords``) and resizes the masks back to ``orig_hw``.
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if state is None:
        if features_of is None:
            raise ValueError("propagate_components needs features_of (cached features) or a prepared state")
        state = new_inference_state(num_slices, (h, w), predictor.device)
        frames = sorted({z for c in components for z in range(*c.z_range)})
        inject_features(predictor, state, frames, features_of)
    out = []
    with _quiet_progress_bars():
        for comp in components:
            z0, z1 = comp.z_range
            key = comp.key_z
            if not (0 <= z0 <= key < z1 <= num_slices):
                raise ValueError(f"component of class {comp.label}: key slice {key} outside its slices [{z0}, {z1}) "
                                 f"or beyond the volume's {num_slices} slices")
            predictor.reset_state(state)
            p = comp.prompt
            predictor.add_new_points_or_box(state, frame_idx=key, obj_id=1, points=p.point_coords,
                                            labels=p.point_labels, box=p.box)
            logits = np.full((z1 - z0, h, w), np.nan, dtype=np.float32)
            for reverse, steps in ((False, z1 - 1 - key), (True, key - z0)):
                for z, _ids, masks in predictor.propagate_in_video(state, start_frame_idx=key,
                                                                   max_frame_num_to_track=steps, reverse=reverse):
                    logits[z - z0] = masks[0, 0].float().cpu().numpy()
            if np.isnan(logits).any():  # a slice SAM-2 skipped would silently read as background
                raise RuntimeError(f"SAM-2 propagation left slices of [{z0}, {z1}) without output")
            out.append(logits)
    predictor.reset_state(state)
    return out


def merge_component_logits(components: Sequence[ComponentPrompt], logits: Sequence[np.ndarray],
                           shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-component logits -> one label map (Z, Y, X) int16 and a bool map of the slices SAM-2 covered.

    A pixel takes the class of the component with the highest positive logit there (an overlap goes to the more
    certain mask), 0 where none is positive; slices no component spans are -1 (SAM-2 said nothing there)."""
    best = np.full(shape, -np.inf, dtype=np.float32)
    out = np.zeros(shape, dtype=np.int16)
    covered = np.zeros(shape[0], dtype=bool)
    for comp, lg in zip(components, logits, strict=True):
        z0, z1 = comp.z_range
        covered[z0:z1] = True
        win = (lg > 0) & (lg > best[z0:z1])
        out[z0:z1][win] = comp.label
        best[z0:z1][win] = lg[win]
    out[~covered] = -1
    return out, covered
