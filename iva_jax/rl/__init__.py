"""RL fine-tuning: losses matched to RLax / TRL / verl, KL control, advantages, and a verifiable task.

Modules: masking (masked stats, loss aggregation), advantages (GAE, GRPO, KL-penalized rewards),
policy_losses (PPO clip / dual-clip, value loss, entropy), kl (estimators, controllers),
preference (DPO, reward model), distill (KD, NT-Xent), shaping (HRM-RPO), tasks, config;
policy (the decoder as a policy: LoRA, scalar head, teacher-forced log-probs), rollout (prompt
batches, group sampling, EOS masks), trainers (PPO / GRPO, DPO, reward model, telemetry).
"""

from iva_jax.rl.advantages import (  # noqa: F401
    gae_advantages_and_returns,
    grpo_advantages,
    kl_penalized_rewards,
    truncated_generalized_advantage_estimation,
)
from iva_jax.rl.config import RLConfig, TaskConfig  # noqa: F401
from iva_jax.rl.distill import distillation_loss, nt_xent_loss  # noqa: F401
from iva_jax.rl.kl import AdaptiveKLController, FixedKLController, adaptive_kl_update, kl_penalty  # noqa: F401
from iva_jax.rl.masking import agg_loss, fill_masked, masked_mean, masked_sum, masked_var, masked_whiten  # noqa: F401
from iva_jax.rl.policy_losses import (  # noqa: F401
    clipped_surrogate_pg_loss,
    clipped_value_loss,
    entropy_from_logits,
    entropy_loss,
    logprobs_from_logits,
    masked_entropy,
    policy_gradient_loss,
    ppo_clip_objective,
    ppo_policy_loss,
)
from iva_jax.rl.preference import dpo_loss, pairwise_reward_loss  # noqa: F401
from iva_jax.rl.policy import Policy, ScalarHead, response_forward, sequence_logprobs, sequence_scores  # noqa: F401
from iva_jax.rl.rollout import (  # noqa: F401
    PromptBatch,
    Rollout,
    left_pad,
    preference_batch,
    response_mask,
    sample_rollout,
    text_reward_fn,
)
from iva_jax.rl.shaping import (  # noqa: F401
    HRMRPOShaping,
    expected_ponder_steps,
    halting_reward,
    hrm_rpo_reward,
    memory_reward,
)
from iva_jax.rl.tasks import AdditionProblem, AdditionTask, extract_answer, make_addition_splits  # noqa: F401
from iva_jax.rl.trainers import (  # noqa: F401
    DPOTrainer,
    GRPOTrainer,
    PolicyGradientTrainer,
    PPOTrainer,
    RewardModelTrainer,
    RLState,
    telemetry_record,
)
