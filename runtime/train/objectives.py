"""Objectives: what a micro-batch's loss is, on the one training loop.

The loop gives each objective the model's output and the micro-batch's share of the step's target
tokens. The language-model loss is a mean over target tokens, so it is weighted by
`targets_in_micro_batch / targets_in_global_batch` (times dp, undone by DDP's gradient average):
the step's gradient is then the gradient of the mean over every target token of the global batch,
however the batch is split over micro-batches and ranks, also when SFT masks make the counts
unequal. MoE auxiliary and MTP losses are per-micro-batch means, averaged over the step.
"""

from dataclasses import dataclass

import torch

from ...compiler.errors import UserError


@dataclass
class StepShare:
    """How much of the step one micro-batch is."""

    token_weight: float  # targets in this micro-batch / targets in the global batch, times dp
    batch_weight: float  # 1 / micro-batches per rank per step


class NextToken:
    """Pretraining: next-token cross entropy on every position (labels from packing)."""

    name = "pretrain"

    def loss(self, out, share: StepShare) -> torch.Tensor:
        loss = out.lm_loss * share.token_weight
        extra = out.loss - out.lm_loss  # aux + weighted MTP, as the model adds them
        return loss + extra * share.batch_weight


class MaskedNextToken(NextToken):
    """SFT: the same loss; the data's labels are -100 outside assistant turns, so only those count."""

    name = "sft"


OBJECTIVES = {"pretrain": NextToken, "sft": MaskedNextToken}


def build_objective(name: str):
    if name not in OBJECTIVES:
        raise UserError(f"train.objective = {name!r} is not implemented by this runtime yet "
                        f"(available: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]()
