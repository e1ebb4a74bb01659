"""Knowledge distillation: KD loss transforms, intermediate capture, teacher caching, a stage.

Loss transforms map a loss function ``(model, batch, rng) -> (loss, aux)`` to a new one that
adds distillation terms (Hinton KD, DKD, FitNets hints, attention transfer, relational KD, or
a weighted sum of any of them), so they stack with pruning and quantization. Importing the
package registers the ``distill`` stage.
"""

from methods.distillation.capture import CaptureError
from methods.distillation.capture import capture_intermediates
from methods.distillation.capture import intermediates
from methods.distillation.capture import module_paths
from methods.distillation.hints import HintedStudent
from methods.distillation.hints import unwrap_student
from methods.distillation.hints import with_hints
from methods.distillation.losses import attention_loss
from methods.distillation.losses import attention_map
from methods.distillation.losses import dkd_loss
from methods.distillation.losses import dkd_parts
from methods.distillation.losses import hint_loss
from methods.distillation.losses import kd_loss
from methods.distillation.losses import pairwise_distances
from methods.distillation.losses import rkd_angle_loss
from methods.distillation.losses import rkd_distance_loss
from methods.distillation.stage import DistillStage
from methods.distillation.stage import KDTermConfig
from methods.distillation.stage import keep_zeros
from methods.distillation.stage import run_distill
from methods.distillation.teacher import IndexedBatchSampler
from methods.distillation.teacher import OnlineTeacher
from methods.distillation.teacher import TeacherCache
from methods.distillation.teacher import as_teacher_outputs
from methods.distillation.teacher import build_teacher_cache
from methods.distillation.transforms import KD_TERMS
from methods.distillation.transforms import KDLoss
from methods.distillation.transforms import KDTerm
from methods.distillation.transforms import attention_term
from methods.distillation.transforms import attention_transfer
from methods.distillation.transforms import distill
from methods.distillation.transforms import dkd
from methods.distillation.transforms import dkd_term
from methods.distillation.transforms import fitnets
from methods.distillation.transforms import fitnets_term
from methods.distillation.transforms import hinton_term
from methods.distillation.transforms import list_kd_terms
from methods.distillation.transforms import make_kd_term
from methods.distillation.transforms import register_kd_term
from methods.distillation.transforms import rkd
from methods.distillation.transforms import rkd_angle_term
from methods.distillation.transforms import rkd_distance_term
from methods.distillation.transforms import weighted_sum

__all__ = [
    "CaptureError",
    "DistillStage",
    "HintedStudent",
    "IndexedBatchSampler",
    "KDLoss",
    "KDTerm",
    "KDTermConfig",
    "KD_TERMS",
    "OnlineTeacher",
    "TeacherCache",
    "as_teacher_outputs",
    "attention_loss",
    "attention_map",
    "attention_term",
    "attention_transfer",
    "build_teacher_cache",
    "capture_intermediates",
    "distill",
    "dkd",
    "dkd_loss",
    "dkd_parts",
    "dkd_term",
    "fitnets",
    "fitnets_term",
    "hint_loss",
    "hinton_term",
    "intermediates",
    "keep_zeros",
    "kd_loss",
    "list_kd_terms",
    "make_kd_term",
    "module_paths",
    "pairwise_distances",
    "register_kd_term",
    "rkd",
    "rkd_angle_loss",
    "rkd_angle_term",
    "rkd_distance_loss",
    "rkd_distance_term",
    "run_distill",
    "unwrap_student",
    "weighted_sum",
    "with_hints",
]
