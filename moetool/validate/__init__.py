"""``moetool validate``: prove a converted checkpoint (or state file) right against its original, or
name what is wrong. Every check returns plain :class:`Check` records; the CLI prints them.

1. structure  every original tensor accounted for, nothing extra, shapes/dtypes/config consistent,
              output sha256 as moetool.json records (``structure.py``).
2. tensors    each FP8 tensor equals the block-FP8 recipe applied to the original, byte for byte
              (scales bit for bit); copied and fused float tensors equal their source bytes
              (``tensors.py``).
3. kernels    the FP8 block grouped GEMM on the stored layout against the float32 GEMM of the
              original: DeepGEMM where it is importable on an SM90 card, else Triton (``--backend``
              forces one; torch reference on ``--device cpu``); a failure names the experts that
              disagree (``kernels.py``, through the GEMM backend of ``backend.py``).
4. moe        the model's routing + experts (+ fused slots) on the converted weights against the
              original layer in float32: same top-k ids, calc_diff bounded (``moe.py``).
5. ssm        T decode steps from the converted state against the original (``states.py``).

Checks 1-4 run in one pass (``run.py``): ``reads.py`` plans which bytes each step reads, each MoE layer
of both checkpoints is read once and fed to the layer checks 2-4 through the protocol of
``protocol.py``; ``report.py`` holds the records.
"""

from moetool.validate.backend import BACKENDS, Backend, calc_diff, resolve_backend
from moetool.validate.moe import weighted_sum
from moetool.validate.options import MIN_READ_BUDGET, ValidateOptions, default_read_budget
from moetool.validate.protocol import Context, LayerCheck, Tensors
from moetool.validate.regions import region_name
from moetool.validate.report import TIMING_KEYS, Check, Report
from moetool.validate.run import Validator, validate_checkpoints
from moetool.validate.states import validate_states
from moetool.validate.structure import ADDED_CONFIG_KEYS

__all__ = [
    "ADDED_CONFIG_KEYS",
    "BACKENDS",
    "MIN_READ_BUDGET",
    "TIMING_KEYS",
    "Backend",
    "Check",
    "Context",
    "LayerCheck",
    "Report",
    "Tensors",
    "ValidateOptions",
    "Validator",
    "calc_diff",
    "default_read_budget",
    "region_name",
    "resolve_backend",
    "validate_checkpoints",
    "validate_states",
    "weighted_sum",
]
