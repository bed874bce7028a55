"""Typed schema behind `conf/`: a misspelt key or a wrong type fails when the config is composed,
before any data is touched or any run is opened.

Each dataclass is the schema of one config group, and each group mirrors one module:
`dataset` -> `benchmark.data`, `backbone` and `strategy` -> `benchmark.models.backbones`,
`head` -> `benchmark.models.classifier`, `trainer` -> Lightning's Trainer (arguments pass
through), `tracking` -> `benchmark.cell.mlflow_run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A config value from a fixed set: OmegaConf refuses any other with the valid ones listed,
    and members compare equal to their names (`strategy.bn == "eval"`)."""

    def __str__(self) -> str:
        return self.value


class TestSplit(Choice):
    random = "random"  # stratified, fixed by dataset.split_seed
    sorted = "sorted"  # the study's: the last share of each class's sorted file names


class BatchNorm(Choice):
    """What BatchNorm layers do while a cell trains (README, "BatchNorm policy")."""

    # every BatchNorm layer keeps its ImageNet running statistics and normalises with them in
    # training as at evaluation; the affine weights train where their stage trains. A fit that
    # cannot learn (lr 0) then keeps its start, and LP-FT's probe sees the features it was fit on
    frozen = "frozen"
    eval = "eval"  # frozen parts keep ImageNet statistics; training stages use batch statistics
    train = "train"  # every part drifts with the new data (the study's freeze)


class Fit(Choice):
    sgd = "sgd"  # Lightning epochs with the optim group
    lbfgs = "lbfgs"  # the linear probe: logistic regression on cached features


class HeadInit(Choice):
    random = "random"  # a new head (nn.Linear's initialisation)
    # LP-FT (Kumar et al. 2022): the linear probe's fit on the frozen features (L-BFGS, C chosen
    # on val), its standardisation folded into the head; then every layer fine-tunes from it
    probe = "probe"


class Selection(Choice):
    # ours: the checkpoint best on a validation split carved from train; the test split scored
    # once with it (test_acc)
    held_out = "held_out"
    # the study's: no validation split; the evaluation split scored after every epoch and its
    # maximum reported (max_val_acc: optimistic, chosen on the split it is read from)
    max_eval = "max_eval"


class Pruner(Choice):
    """Optuna's pruners, which end a tuning trial early on its validation accuracy epoch by
    epoch (multi-fidelity: the hopeless trials cost a few epochs, not a whole fit)."""

    successive_halving = "successive_halving"  # asynchronous successive halving (ASHA)
    hyperband = "hyperband"  # several successive-halving brackets of different minimum epochs


class Startup(Choice):
    """Where the tuning's first trials go, before TPE models the others (tune.startup_trials)."""

    random = "random"  # Optuna's: independent log-uniform draws, seeded by the cell's seed
    # A scrambled Sobol sequence (scipy.stats.qmc), seeded by the cell's seed: a few points that
    # cover every dimension's range evenly, where random draws can cluster.
    sobol = "sobol"


class Optimizer(Choice):
    sgd = "sgd"
    adamw = "adamw"


class Scheduler(Choice):
    cosine = "cosine"
    step = "step"
    constant = "constant"


@dataclass
class DatasetConfig:
    name: str = MISSING
    # imagefolder: the folder of class folders (or of train/, val/, test/ holding them).
    root: str | None = None
    # csv: a file with columns path,label[,split]; relative paths are relative to it.
    file: str | None = None
    # A subset of the classes (folder names); None takes every class found.
    classes: list[str] | None = None
    # caltech256: keep 257.clutter as a class, as the study did.
    include_clutter: bool = True
    # Without an official test split: `random` (stratified, fixed by split_seed for every run)
    # or `sorted` (the study's: the last test_fraction of each class's sorted file names).
    test_split: TestSplit = TestSplit.random
    # simpsons: Kaggle's kaggle_simpson_testset/ (its frames downscaled x0.357) as the test
    # split, a resolution-shift test (true, or null: when it is there), or a test split carved
    # from the native frames as above (false: conf/dataset/simpsons.yaml's default). Characters
    # it has no images of are then left out of every split, with one line naming them.
    official_test: bool | None = None
    # simpsons with a test split carved from the native frames: Kaggle's test set as a second
    # test of the same trained model (split `shift`, metrics shift_test_acc / shift_test_loss):
    # robustness to its x0.357 resolution shift, one more test pass, never mixed with the native
    # test. Its images that are near-duplicates of any native frame are left out of it. null (as
    # false): no shift test (null keeps the cell keys of configs written before this option).
    shift_test: bool | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    # Share of each class of the training data held back as the validation split that selects
    # the checkpoint; drawn with the run's seed. The test split is never used for selection.
    val_fraction: float = 0.2
    # Near-duplicates never straddle splits: images whose 256-bit difference hashes (imagehash)
    # differ in at most this many bits are one group, kept whole in one split (21: Kaggle's
    # downscaled Simpsons test images are within 16 bits of their training frames; unrelated
    # images are about 128 apart). null: 21, the default (null keeps the cell keys of configs
    # written before this option); 0: identical hashes only. Byte-identical files always group.
    near_duplicate_bits: int | None = None
    # Fetch the official files (URL or Kaggle) when the data is not under paths.data_root.
    download: bool = True


@dataclass
class ColourConfig:
    name: str = MISSING
    # Luminance only, replicated to the backbone's three input channels.
    grayscale: bool = False


@dataclass
class StrategyConfig:
    name: str = MISSING
    # Backbone stages that train, counted from the top: None all (finetune), 0 none (freeze),
    # k the top k (partial). Stages are defined per backbone family by output stride.
    trainable_stages: int | None = None
    # BatchNorm while training: `eval` keeps ImageNet statistics in the frozen parts (the
    # training stages normalise by batch and update theirs); `frozen` keeps them everywhere
    # (lp_ft: its head was fitted on those features); `train` lets every part drift with the
    # new data, as the study's "freeze" did.
    bn: BatchNorm = BatchNorm.eval
    lr: float = 1e-3
    # two_stage: at this epoch, unfreeze the top `unfreeze_stages` stages (None: all) and train
    # them at lr x unfreeze_lr_factor, the head going on at its own lr.
    unfreeze_at_epoch: int | None = None
    unfreeze_stages: int | None = None
    unfreeze_lr_factor: float = 0.1
    # false: training images get the evaluation transform, whatever `augment` says (freeze: the
    # backbone's features are then computed once).
    train_augmentation: bool = True
    # How the head is fitted: `sgd` (Lightning epochs with the optim group) or `lbfgs` (the
    # linear probe: logistic regression on cached features, its L2 strength chosen on val).
    fit: Fit = Fit.sgd
    # lbfgs: the inverse L2 strengths C tried (scikit-learn's LogisticRegression).
    probe_c: list[float] = field(default_factory=list)
    # How the head starts (null: random). `probe` (lp_ft): fitted first by the linear probe on
    # the frozen backbone's features (C from probe_c), then everything fine-tunes from it.
    head_init: HeadInit | None = None
    # The fine-tuning rate is lr x this (null: 1). lp_ft: 0.1, the lower rate of Kumar et al.'s
    # fine-tuning stage, so that the fitted head is not undone and the features not distorted.
    ft_lr_factor: float | None = None


@dataclass
class HeadConfig:
    name: str = MISSING
    # Hidden layer widths of an MLP head (empty: one linear layer), each Linear-[BN]-ReLU-Dropout.
    hidden: list[int] = field(default_factory=list)
    batchnorm: bool = False
    dropout: float = 0.0


@dataclass
class AugmentConfig:
    name: str = MISSING
    # torchvision.transforms.v2 classes with their arguments (`_target_`), applied to training
    # images in order; `_partial_: true` ones receive the backbone's size and interpolation.
    # The backbone's own resize and normalisation always follow and are not listed here.
    transforms: list[Any] = field(default_factory=list)


@dataclass
class BackboneConfig:
    name: str = MISSING
    # A local state-dict file with the ImageNet weights; overrides packaged or downloaded weights.
    weights_path: str | None = None
    # backbone=timm: the timm model's name and pretrained tag (convnext_small.fb_in22k_ft_in1k).
    model: str | None = None


@dataclass
class OptimConfig:
    """Optimizer and schedule over `trainer.max_epochs`; the learning rate is the strategy's."""

    name: str = MISSING
    optimizer: Optimizer = Optimizer.sgd
    momentum: float = 0.9  # sgd
    weight_decay: float = 1e-4
    # The strategy's lr is tuned for SGD; AdamW takes steps of another size.
    lr_factor: float = 1.0
    scheduler: Scheduler = Scheduler.cosine
    warmup_epochs: int = 0  # linear warm-up before the cosine
    step_size: int = 10  # step: multiply by gamma every step_size epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    # Discriminative learning rates: the backbone trains at lr x this factor.
    backbone_lr_factor: float = 1.0
    # Stop when val_acc has not improved for this many epochs (None: never).
    early_stopping_patience: int | None = None


@dataclass
class ProtocolConfig:
    """How a cell's result is selected and read (conf/protocol/)."""

    name: str = MISSING
    selection: Selection = Selection.held_out
    # A budget in optimizer steps, not epochs alone: trainer.max_epochs is raised so that the
    # fit takes at least this many steps (224 images at batch 32: 7 steps an epoch, so 10 epochs
    # are 70 steps); it is also Lightning's `min_steps` (no early stop before). null: epochs.
    min_steps: int | None = None


@dataclass
class TuneConfig:
    """`tune.trials=K`: the cell's lr (and a head's weight decay) searched on the validation split
    before its fit (benchmark.cell.tune). Every key is null by default: an untuned cell's identity
    does not mention tuning."""

    # The `tune` group's choice (conf/tune/): null for tune=none, so no cell key moves.
    name: str | None = None
    trials: int | None = None  # null: no tuning, the strategy's lr
    epochs: int | None = None  # a trial's epochs (null: trainer.max_epochs): finetune's budget
    # ...or this share of trainer.max_epochs (rounded, at least 2): tune=fair's 0.3
    epochs_fraction: float | None = None
    # The trial-epochs all trials together may run, as a share of trainer.max_epochs (null:
    # `trials` full-length trials): a pruned trial's unspent epochs go to further trials, up to
    # `trials` of them, so every strategy of a cell spends the same budget.
    budget_fraction: float | None = None
    lr_range: list[float] | None = None  # log-uniform (null: [1e-4, 0.3])
    weight_decay_range: list[float] | None = None  # every strategy (null: [1e-6, 1e-2])
    # When the backbone trains: the factor of its rate (optim.backbone_lr_factor; two_stage's
    # strategy.unfreeze_lr_factor), log-uniform in this range (null: not searched).
    backbone_lr_factor_range: list[float] | None = None
    # Trials pruned on val_acc epoch by epoch (null: every trial runs all its epochs).
    pruner: Pruner | None = None
    reduction_factor: int | None = None  # the pruner's (null: Optuna's, 3)
    # The pruner's min_resource: the epochs a trial runs before its first comparison (null: 1).
    min_epochs: int | None = None
    # TPE's random trials before it models the others (null: Optuna's 10, i.e. all random when
    # trials <= 10; tune=fair: 4 of its 8).
    startup_trials: int | None = None
    # How those are placed (null: random).
    startup: Startup | None = None
    # The strategy's own values (its lr, weight decay and backbone factor, clipped into the
    # ranges) as the first trial: the choice is never worse on validation than the untuned
    # recipe at a trial's length (null: false).
    recipe_first: bool | None = None
    # Tune once per cell, on this seed's validation split: a cell of another seed takes the values
    # that this seed's FINISHED cell (same config otherwise) chose, and tunes itself only when
    # there is none (null: every seed tunes on its own split). The test split is the same for
    # every seed (dataset.split_seed or an official one), so the donor never saw it.
    reuse_seed: int | None = None

    def trial_epochs(self, max_epochs: int) -> int:
        """A trial's epochs: `epochs`, a share of the cell's `max_epochs` (at least 2: one to
        compare after) or the cell's own."""
        if self.epochs_fraction:
            return max(2, round(self.epochs_fraction * max_epochs))
        return self.epochs or max_epochs

    def budget_epochs(self, max_epochs: int) -> int:
        """The trial-epochs all trials together may run: `budget_fraction` of the cell's
        epochs (at least one trial's), else every trial at full length."""
        if self.budget_fraction:
            return max(self.trial_epochs(max_epochs), round(self.budget_fraction * max_epochs))
        return (self.trials or 0) * self.trial_epochs(max_epochs)


@dataclass
class DataConfig:
    batch_size: int = 32
    num_workers: int = 2


@dataclass
class SpeedConfig:
    """What a cell may skip recomputing; none of it changes what a deterministic cell computes."""

    # Decode and resize each image once into a memory-mapped uint8 file in paths.cache_dir,
    # shared by every cell, colour and seed (training crops then come from the central square).
    image_cache: bool = True
    # A frozen backbone (trainable_stages 0, bn eval): extract its features once and cache them,
    # then train the head on them.
    feature_cache: bool = True
    # ...with augmentation on: cache this many augmented views of each training image (0: train
    # from images instead, paying the backbone's forward pass every epoch).
    augmented_views: int = 0
    # Backbone and batches in channels-last memory format, on CUDA and on the CPU alike (faster
    # convolutions: Lite0 on this 2-core CPU, forward 1.55x, train step 1.54x; same fp32 math).
    channels_last: bool = True
    # torch.compile the model (pays a compilation at the start; pays off on long GPU cells).
    compile: bool = False


@dataclass
class PathsConfig:
    data_root: str = "${oc.env:BENCHMARK_DATA_ROOT,data}"
    # Remembered image checks, the split manifests, decoded images and cached features: in the
    # user's cache ($XDG_CACHE_HOME/benchmark, else ~/.cache/benchmark) unless
    # $BENCHMARK_CACHE_DIR says where; never in the data folder, which a cell only reads. (A
    # volatile key: where the cache lives is no part of a cell's identity.)
    cache_dir: str = (
        "${oc.env:BENCHMARK_CACHE_DIR,${oc.env:XDG_CACHE_HOME,${oc.env:HOME,.}/.cache}/benchmark}"
    )
    # Where checkpoints of this run go; Hydra's per-run folder by default.
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrackingConfig:
    # None: a SQLite store `mlflow.db` in the current directory (MLflow's own default).
    uri: str | None = "${oc.env:MLFLOW_TRACKING_URI,null}"
    experiment: str = "benchmark"
    # The checkpoint selected on validation as the run's MLflow logged model.
    log_model: bool = True
    # MLflow's system metrics (CPU, memory, GPU) sampled while the cell runs.
    system_metrics: bool = True
    # plan=true: the store whose FINISHED runs time the cells of the plan (null: `uri` itself).
    # Only read, never written.
    history: str | None = None


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    colour: ColourConfig = MISSING
    strategy: StrategyConfig = MISSING
    backbone: BackboneConfig = MISSING
    head: HeadConfig = MISSING
    augment: AugmentConfig = MISSING
    # Keyword arguments of lightning.pytorch.Trainer, instantiated as they are.
    trainer: Any = MISSING
    # Lightning loggers by name (conf/logger/): the cell's MLflow run, plus any others.
    logger: Any = MISSING
    # More Lightning callbacks for the cell's own fit, by name (conf/callbacks/:
    # `callbacks=early_stopping`, or `+callbacks.NAME._target_=...`), instantiated as they are;
    # null (the default): none, and no cell key moves. Not given to tuning trials.
    callbacks: Any = None
    optim: OptimConfig = MISSING
    protocol: ProtocolConfig = MISSING
    tune: TuneConfig = field(default_factory=TuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    # Run the cell even if the tracking store already has it FINISHED (same config hash).
    rerun: bool = False
    # Print the plan instead: every cell of the sweep (or the one cell), whether the store has
    # it FINISHED already, its images and its estimated time; nothing trains and no run opens
    # (benchmark.orchestration.plan).
    plan: bool = False
    # Every line of Lightning, MLflow and Optuna on the console, the known-harmless ones too
    # (benchmark.runtime.console). How much the cell says, not what it computes: a volatile key.
    verbose: bool = False


def register_configs() -> None:
    """The schema behind conf/config.yaml (launchers register themselves: hydra_plugins/)."""
    ConfigStore.instance().store(name="schema", node=Config)
