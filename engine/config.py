"""Typed configuration: dataclass sections, YAML recipes, dotted overrides.

OmegaConf's structured configs do the type checking and reject unknown keys;
this module turns their multi-line errors into one line naming the key, and
saves the resolved config next to every output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class DataConfig:
    # Raw source the `prepare` stage turns into shards when `train` is empty:
    # `fashion-mnist:DIR`, `imagefolder:DIR`, `digits:` (see engine.data.sources).
    source: str = f"fashion-mnist:{FASHION_MNIST_DIR}"
    source_train_split: str = "train"
    source_val_split: str = "test"
    # Images per class carved (seeded) out of the training source into a `holdout` split before
    # anything trains on it: choose settings with data.val_split=holdout, then read the test split once.
    holdout_per_class: int = 0
    # Shard locations (a WebDataset shard directory or an FFCV .beton, any
    # fsspec URL). Empty: use the shards `prepare` wrote under OUT/data.
    train: str = ""
    val: str = ""
    train_split: str = "train"
    val_split: str = "val"
    format: str = "wds"  # reader for prepared data: wds | ffcv
    channels: int = 1  # 1 (grey) or 3 (RGB); readers convert to this
    image_size: int = 28
    crop_pct: float = 1.0  # eval preset: resize to size/crop_pct, centre-crop size
    train_preset: str = "train"  # train | eval | raw
    train_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop area range
    eval_preset: str = "eval"
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    shard_size: int = 5000
    shuffle_buffer: int = 2000
    batch_size: int = 256
    num_workers: int = 0
    write_workers: int = 2
    ffcv: bool = True  # prepare also writes .beton files


@dataclass
class ModelConfig:
    """Arguments of engine.models.create_model (besides classes and channels)."""
    name: str = "resnet18"
    small_input: bool = True  # 3x3 stride-1 stem, no max-pool (28-64 px data)
    width: int = 16  # ResNet stage widths width x (1, 2, 4, 8); 64 = the standard ResNet


@dataclass
class TeacherConfig:
    """Squeeze: `ssl` (SimCLR pretraining + linear probe), `supervised`, or `checkpoint`."""
    mode: str = "ssl"
    checkpoint: str = ""  # path or URL of a user's checkpoint (mode=checkpoint)
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 2  # supervised epochs
    lr: float = 0.05  # supervised: SGD momentum 0.9, cosine
    weight_decay: float = 5e-4
    batch_size: int = 256
    ssl_epochs: int = 3
    ssl_lr: float = 0.3
    ssl_temperature: float = 0.2
    ssl_proj_dim: int = 128
    probe_epochs: int = 3  # linear probe on frozen features (SGD, cosine)
    probe_lr: float = 0.1
    finetune_epochs: int = 0  # optional short fine-tune of the whole net after the probe
    finetune_lr: float = 0.01
    ssl_train_limit: int = 0  # SimCLR sees only the first N (shuffled) samples per epoch (0: all)


@dataclass
class ScddConfig:
    """SC-DD / SRe2L recovery (METHODS.md section 1)."""
    iterations: int = 1000
    lr: float = 0.25
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    random_resized_crop: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    flip: bool = True
    jitter: int = 4  # random roll in pixels
    init: str = "noise"  # noise | real
    init_lr: float = 0.05  # Adam lr when starting from real images
    # real init: `random` (a seeded choice), `confident` (the teacher's highest probability for the
    # class among a seeded pool of init_pool x ipc images per class) or `kmeans` (the pool image
    # nearest each of ipc k-means centroids of the teacher's features); distinct per IPC index
    init_select: str = "random"
    init_pool: int = 5
    # diversity term: r_div x mean cosine similarity of the teacher's features between the IPC
    # indices of a class within a unit (synth.ipc_per_unit of them; 0: off)
    r_div: float = 0.0
    amp: bool = True  # bf16 autocast where the device supports it (CUDA)
    channels_last: bool = True  # where the device benefits (CUDA)
    log_every: int = 50


@dataclass
class TeslaConfig:
    """Soft-label TESLA distillation (METHODS.md section 2): every argument of
    engine.synth.tesla.distill. Defaults: the ImageNet-1K IPC 1 reference. Units are
    IPC slices over all classes (synth.ipc_per_unit IPC indices each; synth.class_block
    is not used); each slice learns its own step size."""
    iterations: int = 5000  # distillation iterations per IPC slice (MTT's default)
    syn_steps: int = 10  # N: student steps per iteration
    expert_epochs: int = 3  # M: the target is the expert M epochs after the start
    max_start_epoch: int = 10  # start epochs are drawn from 0 .. max_start_epoch - 1
    batch_syn: int = 100  # synthetic images per student step (0: all images of the slice)
    lr_img: float = 1e4  # SGD lr of the images
    lr_lr: float = 1e-4  # SGD lr of the learned step size alpha
    syn_lr_init: float = 0.01  # alpha starts at the experts' lr
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    mode: str = "exact"  # exact | tesla | unrolled (gradient of the matching loss)
    label_mode: str = "per_iteration"  # per_iteration (published) | frozen | hard
    label_expert: int = 0  # expert whose last target epoch labels (and judges) the images
    init: str = "real"  # real (distinct real images per class and IPC index) | noise
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"  # DSA families ('' or none: no augmentation)
    log_every: int = 10  # iterations between loss records in the unit manifests


@dataclass
class RdedConfig:
    """RDED (engine.synth.rded): real crops picked by the teacher, stitched k x k. Defaults: the reference's ImageNet-1K recipe (LINs-lab/RDED,
    scripts/imagenet-1k_10ipc_resnet-18_to_resnet-18_cr5.sh; the CIFAR and Tiny-ImageNet scripts
    use factor 1)."""
    factor: int = 2  # factor x factor patches per image (--factor); 1: one whole crop per image
    candidates_per_image: int = 5  # random crops scored per real image, the best one kept (--num-crop)
    num_real: int = 300  # real images per class, a seeded choice (--mipc); >= ipc * factor^2
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area range (RandomResizedCrop)
    crop_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])  # crop aspect range (square, as the reference)
    score_input: str = "pad"  # pad (zeros to image_size, the reference) | resize (patch upsampled)
    score_batch_size: int = 256  # crops per teacher forward pass while scoring


@dataclass
class DatadamNetConfig:
    """The randomly initialised ConvNet DataDAM matches attention in (a fresh one every iteration)."""
    name: str = "convnetd3"  # convnetd3 | convnetd4 | convnetd5 | convnet (then `depth` blocks)
    depth: int = 0  # 0: the name's depth; with name convnet: the number of blocks
    width: int = 128  # channels per block
    norm: str = "instance"  # instance | batch (train mode: batch statistics) | none


@dataclass
class DatadamConfig:
    """DataDAM attention matching (METHODS.md section 4; engine.synth.datadam). Defaults: the
    reference. Units are class blocks (synth.class_block classes, all their IPC indices)."""
    iterations: int = 8000
    lr: float = 1.0  # SGD lr of the pixels (normalised space)
    momentum: float = 0.5
    power: float = 4.0  # p of the attention map sum_channels |f|^p (at least 1)
    lam: float = 0.01  # lambda: weight of the final-embedding term
    loss_scale: float = 100.0  # both terms are multiplied by this
    real_batch: int = 256  # real images per class per iteration
    sample_with_replacement: bool = False  # a real batch larger than a class: error (false) or draw with replacement
    real_per_class: int = 0  # real pool per class the batches come from: a seeded subset of N images (0: all)
    init: str = "real"  # real (distinct real images per class and IPC index) | noise
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"  # one per-batch draw per class ('' or none: off)
    net: DatadamNetConfig = field(default_factory=DatadamNetConfig)
    log_every: int = 50  # iterations between loss records in the unit manifests


@dataclass
class SynthConfig:
    ipc: int = 10
    class_block: int = 10  # classes per recovery batch (one image per class); DataDAM: classes per unit
    ipc_per_unit: int = 10  # IPC indices per unit of work (several share one forward pass); not DataDAM's
    scdd: ScddConfig = field(default_factory=ScddConfig)
    tesla: TeslaConfig = field(default_factory=TeslaConfig)
    rded: RdedConfig = field(default_factory=RdedConfig)
    datadam: DatadamConfig = field(default_factory=DatadamConfig)


@dataclass
class RelabelConfig:
    """Soft labels: `online` (teacher runs during post-training on a replayable crop
    stream) or `stored` (per epoch: crop parameters + top-k fp16 logits)."""
    mode: str = "online"
    top_k: int = 10
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    mix: str = "none"  # none | cutmix | mixup
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8


@dataclass
class TeslaEvalConfig:
    """Evaluation protocol `tesla` (METHODS.md section 2): a fresh eval.student trained on
    the images with their stored soft labels (soft-target CE, no temperature) and DSA,
    SGD at the learned step size; the random-real control is labelled by the same expert."""
    epochs: int = 1000
    batch_size: int = 256
    lr: float = 0.0  # 0: the learned alpha (the mean over IPC slices); > 0: this lr instead
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, as the reference
    lr_decay_at: float = 0.5  # lr x lr_decay_factor from epoch int(epochs * lr_decay_at) on
    lr_decay_factor: float = 0.1
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"


@dataclass
class DatadamEvalConfig:
    """DataDAM's hard-label protocol (the DC/DSA/DM evaluation): a fresh ConvNet of
    synth.datadam.net's depth trained on the images with their class labels (cross-entropy) and DSA,
    SGD with momentum and weight decay, lr x lr_decay_factor from a fraction of the epochs on; the
    random-real control is trained the same way. Reported as distilled.hard / random_real.hard."""
    epochs: int = 1000
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_at: float = 0.5
    lr_decay_factor: float = 0.1
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    width: int = 0  # the student's width (0: synth.datadam.net.width)
    soft: bool = True  # also the soft-label protocol (eval.*, relabel.mode; needs the squeeze teacher)


@dataclass
class EvalConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 300
    batch_size: int = 50
    optimizer: str = "adamw"
    lr: float = 0.001
    weight_decay: float = 0.01  # not applied to BN and bias
    temperature: float = 4.0
    seeds: list[int] = field(default_factory=lambda: [0])
    random_real: bool = True  # train the random-real control too
    hard_control: bool = False  # also train every set with hard labels (is a gain a data or a label effect?)
    full_data_epochs: int = 0  # >0: also train the student on the full data (reference)
    val_limit: int = 0  # validate on the first N samples only (0: all)
    protocol: str = "kd"  # kd (the relabel.mode labels, eval.* optimiser) | tesla (method tesla: eval.tesla)
    tesla: TeslaEvalConfig = field(default_factory=TeslaEvalConfig)
    datadam: DatadamEvalConfig = field(default_factory=DatadamEvalConfig)  # method datadam's hard-label protocol


@dataclass
class ExpertModelConfig:
    """The ConvNet of trajectory matching: depth x [3x3 conv + norm + ReLU + avg pool] + linear."""
    name: str = "convnetd3"  # convnetd3 | convnetd4 | convnetd5 (D4 at 64 px for ImageNet-1K)
    width: int = 128  # channels per block
    norm: str = "instance"  # instance | batch | none


@dataclass
class ExpertsConfig:
    """Expert trajectories for TESLA (METHODS.md sections 2 and 3): E experts trained on the
    real training images with SGD + DSA, flat parameters saved at initialisation and after
    every epoch. Defaults: the reference (SGD lr 0.01, no momentum, batch 256, 50 epochs)."""
    num_experts: int = 100  # the reference buffer script's default
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    lr_decay_epochs: list[int] = field(default_factory=list)  # lr x lr_decay_factor after these epochs (AST: [26])
    lr_decay_factor: float = 0.1  # (AST: 0.6)
    save_epochs: list[int] = field(default_factory=list)  # epochs to keep (0 = initialisation); empty: every epoch
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    # AST smoothing (off by default): CE factors of the first epochs (AST: 0.5, 0.55, ..., 0.95)
    # and the weight of the input-gradient penalty (AST: 2)
    ce_scale_schedule: list[float] = field(default_factory=list)
    grad_penalty: float = 0.0
    model: ExpertModelConfig = field(default_factory=ExpertModelConfig)
    train_limit: int = 0  # train on a seeded class-balanced subset of N images (0: the whole split)
    val_limit: int = 0  # validate each expert on the first N val images (0: all)
    location: str = ""  # experts made elsewhere (a directory or URL); "" = OUT/experts


@dataclass
class ClusterConfig:
    """Where units of work run (engine/cluster). `ray`: actors on a Ray cluster --
    the one `ray job submit` runs under (RAY_ADDRESS), the one at `address`, or a
    new local one; `local`: this process, no Ray (same units, same bytes at the
    same thread count)."""
    backend: str = "ray"  # ray | local
    address: str = ""  # a Ray cluster to join; "" = RAY_ADDRESS when set, else start a local cluster
    num_cpus: int = 0  # CPUs of a new local cluster (0: all this process may use)
    workers: int = 0  # synthesis actors; 0 = one per GPU slot (GPU run) or per CPU slot, at most one per unit
    cpus_per_worker: float = 1.0  # CPU share of an actor (fractions allowed); its torch threads = max(1, floor)
    gpus_per_worker: float = 1.0  # GPU share of an actor when the run uses CUDA
    max_in_flight: int = 2  # units queued on each actor at a time
    max_retries: int = 3  # restarts of a dead actor, and re-dispatches of a unit whose actor died
    relabel_parts: int = 0  # stored relabel: image ranges run as units (0: one per worker slot)
    relabel_epoch_parts: int = 1  # ... times this many epoch ranges
    eval_workers: int = 1  # Ray Train data-parallel workers for student post-training


@dataclass
class EngineConfig:
    name: str = "demo"
    seed: int = 0
    method: str = "scdd"  # scdd | tesla | rded | datadam
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads (0: the CPUs this process may use)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _one_line(exc: OmegaConfBaseException, origin: str) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    where = f"{origin}: " if origin else ""
    if key:
        return f"{where}config key '{key}': {msg}"
    return f"{where}config: {msg}"


def _merge(base, other, origin: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, origin)) from None


def _parse_value(raw: str) -> Any:
    """YAML scalars and lists (`3`, `0.5`, `[1, 2]`, `true`); anything else is a string.

    URIs such as `digits:` or `s3://b/x` stay strings (YAML would read a
    trailing colon as a mapping)."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        return raw
    return raw if value is None and raw.strip() not in ("null", "~") else value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type = EngineConfig) -> Any:
    """Schema defaults <- YAML file <- `key=value` overrides, type-checked.

    Returns an OmegaConf structured config (attribute access, typed)."""
    cfg = OmegaConf.structured(schema)
    if path:
        from .store import read_text

        try:
            loaded = OmegaConf.create(read_text(path))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, path)) from None
        except Exception as exc:  # yaml.YAMLError and friends
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}: not a valid YAML config ({first})") from None
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        cfg = _merge(cfg, loaded, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. data.channels=3)")
        key, raw = item.split("=", 1)
        value: Any = _parse_value(raw)
        for part in reversed(key.strip().split(".")):
            value = {part: value}
        cfg = _merge(cfg, OmegaConf.create(value), f"override '{item}'")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(d: dict, schema: type = EngineConfig) -> Any:
    """The typed config back from `to_dict` (e.g. in a worker process)."""
    cfg = _merge(OmegaConf.structured(schema), OmegaConf.create(d), "config")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def config_hash(cfg) -> str:
    import hashlib

    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]
