"""The DeepSpeed backend: the one model (megabranch.model) as a `deepspeed.pipe.PipelineModule` of model slices.

    layers.py      the layer list (one slice of the model per LayerSpec index) and its tuple adapter
    partition.py   DeepSpeed `parts` from megabranch's cost-model layout
    config.py      the DeepSpeed JSON with megabranch's settings filled in
    grad_norm.py   keeping the fp32 gradient norm DeepSpeed computes and drops
    checkpoint.py  export to / import from DeepSpeed's layer_XX-model_states.pt files
    trainer.py     DeepSpeedTrainer, the training.protocol.Engine over DeepSpeed's PipelineEngine

deepspeed itself is imported only when a PipelineModule is built: the rest works without it.
"""

from .checkpoint import export_deepspeed, import_deepspeed
from .config import load_ds_config
from .layers import PipeUnit, layer_plan
from .partition import PARTITIONS, ds_parts
from .trainer import DeepSpeedTrainer, TokenLoss, build_pipeline_module, canonical_state, init_distributed, local_layers

__all__ = [
    "PARTITIONS",
    "DeepSpeedTrainer",
    "PipeUnit",
    "TokenLoss",
    "build_pipeline_module",
    "canonical_state",
    "ds_parts",
    "export_deepspeed",
    "import_deepspeed",
    "init_distributed",
    "layer_plan",
    "load_ds_config",
    "local_layers",
]
