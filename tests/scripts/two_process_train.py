"""Run by tests/test_multiprocess.py under `accelerate launch --cpu --num_processes 2`.

Trains a controller for a few steps with groups that span both processes, and writes, per
process: the final controller parameters, and per generation batch the gathered rewards and
this process's slice of the advantages.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trainer import LOW, HIGH, PROMPTS, gated_quality_reward, known_profile  # noqa: E402
from tiny import tiny_text_model  # noqa: E402

from knob_grpo import AdaptiveModel, KnobGRPOConfig, KnobGRPOTrainer, TwoStageController  # noqa: E402


class RecordingTrainer(KnobGRPOTrainer):
    records: list

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.records.append({"rewards": rewards.cpu().clone(), "prompts": list(prompts)})
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.records[-1]["advantages"] = out["advantages"].cpu().clone()
        return out


def main(output_dir: str) -> None:
    model, tok = tiny_text_model("olmoe")
    executor = AdaptiveModel(model, tok)
    torch.manual_seed(0)  # same initial controller on both processes
    controller = TwoStageController.for_executor(executor, stage2_mode="prompt", budget_range=(50.0, 150.0))
    dataset = Dataset.from_dict({"prompt": PROMPTS * 8, "budget": [LOW, HIGH] * 8})
    args = KnobGRPOConfig(output_dir=output_dir, num_generations=8, per_device_train_batch_size=4, max_steps=4,
                          learning_rate=1e-2, max_completion_length=2, budget_min_ms=50.0, budget_max_ms=150.0,
                          seed=0, use_cpu=True, logging_steps=1)
    state = PartialState()  # the one the config set up (cpu, gloo)
    trainer = RecordingTrainer(controller, executor, [gated_quality_reward], args=args, train_dataset=dataset,
                               latency_profile=known_profile(executor))
    trainer.records = []
    trainer.train()
    torch.save({"params": {k: v.cpu() for k, v in controller.state_dict().items()}, "records": trainer.records,
                "world_size": state.num_processes, "scale_rewards": trainer.scale_rewards},
               os.path.join(output_dir, f"rank{state.process_index}.pt"))
    state.wait_for_everyone()  # leave together: a process exiting alone can abort the other's gloo teardown
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
