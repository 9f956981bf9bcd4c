from checkpoint.archive import verify_archive
from checkpoint.io import CHECKPOINT_FORMAT, find_resume_checkpoint, link_checkpoint, load_checkpoint, save_checkpoint
from checkpoint.state import capture_rng, load_model_state, restore_rng, unwrap_model
from checkpoint.validate import check_eval_state, check_optimizer_fits, check_resume_state, check_scheduler_fits
from runtime.atomic_write import sweep_temporaries

__all__ = ["CHECKPOINT_FORMAT", "capture_rng", "check_eval_state", "check_optimizer_fits", "check_resume_state", "check_scheduler_fits", "find_resume_checkpoint", "link_checkpoint", "load_checkpoint",
           "load_model_state", "restore_rng", "save_checkpoint", "sweep_temporaries", "unwrap_model",
           "verify_archive"]
