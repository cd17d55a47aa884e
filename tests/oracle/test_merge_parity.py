"""`mistral-train merge`: a LoRA run's adapter merged into its base loads in transformers with the
logits of the adapter model."""

import torch
import transformers

from mistral_train import Mistral
from mistral_train.adapters import load_adapter
from mistral_train.cli import main
from mistral_train.config import AdapterSpec, DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.train import fit



def test_merge_verb_writes_a_folder_transformers_loads_with_the_adapter_models_logits(tmp_path, tiny_base_folder, capsys):
    base = tiny_base_folder
    run_dir = fit(RunConfig(model=ModelSpec(path=str(base)), data=DataSpec(format="messages", eval_path=None),
                            trainer=TrainerSpec(objective="sft", max_steps=2, max_seq_len=64, batch_size=4, lr=2e-2,
                                                sample_max_new_tokens=2, eval_max_new_tokens=0),
                            adapter=AdapterSpec(kind="lora", r=8, alpha=16), run=RunSpec(name="verb", dir=str(tmp_path)),
                            tracking=TrackingSpec(progress_bar=False, plot=False)))
    assert main(["merge", str(run_dir / "final"), "--out", str(tmp_path / "merged")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours = load_adapter(Mistral.from_pretrained(base), run_dir / "final").eval()
    ids = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert main(["merge", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x")]) == 2
