"""Stand-ins for the two modules ``test_modeling_common.py`` imports that the transformers sdist does not ship.

* ``tests/exporters/test_export.py`` -> :class:`ExportTesterMixin`: empty (ONNX/ExecuTorch export is not what this
  referee is about, and upstream's export tests are not available).
* ``tests/generation/test_utils.py`` -> :class:`GenerationTesterMixin`: ``ModelTesterMixin`` only checks that testers
  of generative models inherit it. Upstream's generation suite is not available, so this one holds a few
  ``generate()`` checks written for this project (names start with ``test_referee_``). Each compares what the model
  returns with what it returns uncached (``model.layer_cache.bypass()`` when the harness switched a cache on;
  without a cache both sides are the same computation), so uncached they pass by construction and cached they pass
  only if the cache is lossless within the tolerance the README promises (1e-4 on logits for ``prefix``).
"""

from __future__ import annotations

import contextlib

import torch


class ExportTesterMixin:
    """Empty: upstream's export tests are not in the sdist."""


def uncached(model):
    """``model.layer_cache.bypass()`` if the model has a layer cache, else a no-op context."""
    controller = model.__dict__.get("layer_cache")
    return controller.bypass() if controller is not None else contextlib.nullcontext()


class GenerationTesterMixin:
    """A few ``generate()`` checks of our own (upstream's ``GenerationTesterMixin`` is not in the sdist)."""

    referee_new_tokens = 4
    referee_logits_atol = 1e-4

    def _referee_model(self, model_class):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = model_class(config).eval()
        model.generation_config.eos_token_id = None  # always generate referee_new_tokens tokens
        model.generation_config.pad_token_id = config.get_text_config(decoder=True).pad_token_id or 0
        model.generation_config.do_sample = False
        return model

    def _referee_generate(self, model, input_ids, attention_mask, **extra):
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **extra,
                max_new_tokens=self.referee_new_tokens,
                min_new_tokens=self.referee_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out.sequences, torch.stack(out.logits, dim=1)

    def _referee_check(self, model, input_ids, attention_mask, reference=None, **extra):
        """Generate cached and (again) uncached; the logits must agree within the tolerance, so must the tokens
        wherever the logits do not tie within it. ``extra``: more inputs of the prompt (``token_type_ids``)."""
        sequences, logits = self._referee_generate(model, input_ids, attention_mask, **extra)
        if reference is None:
            with uncached(model):
                reference = self._referee_generate(model, input_ids, attention_mask, **extra)
        ref_sequences, ref_logits = reference
        torch.testing.assert_close(logits, ref_logits, atol=self.referee_logits_atol, rtol=0)
        self.assertEqual(sequences.tolist(), ref_sequences.tolist())
        return sequences, logits

    def _referee_prompts(self):
        """Three prompts of 11 tokens, one left-padded to 8 real tokens, rows 0 and 2 sharing their first 6 tokens."""
        generator = torch.Generator().manual_seed(1234)
        vocab = self.model_tester.vocab_size
        ids = torch.randint(3, vocab, (3, 11), generator=generator)
        ids[2, :6] = ids[0, :6]
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        ids[1, :3] = self.model_tester.pad_token_id
        return ids, mask

    def test_referee_generate_repeated_prompt(self):
        """The same batch generated twice (the second time a cache can serve the prompt) and once uncached."""
        for model_class in self.all_generative_model_classes:
            with self.subTest(model_class.__name__):
                model = self._referee_model(model_class)
                ids, mask = self._referee_prompts()
                first = self._referee_generate(model, ids, mask)
                self._referee_check(model, ids, mask)
                self._referee_check(model, ids, mask, reference=first)

    def test_referee_generate_tester_inputs(self):
        """The tester's own batch generated twice, as upstream's generation tests take it: its masks (holes and
        right padding side by side where the tester draws them so) and its ``token_type_ids``. Upstream's
        ``test_generate_methods_with_logits_to_keep`` once crashed the exact strategy this way on BERT (#30)."""
        for model_class in self.all_generative_model_classes:
            with self.subTest(model_class.__name__):
                model = self._referee_model(model_class)
                _, inputs = self.model_tester.prepare_config_and_inputs_for_common()
                extra = {k: inputs[k] for k in ("token_type_ids",) if k in inputs}
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                first = self._referee_generate(model, ids, mask, **extra)
                self._referee_check(model, ids, mask, **extra)
                self._referee_check(model, ids, mask, reference=first, **extra)

    def test_referee_generate_extended_prompt(self):
        """A prompt, then the same prompt extended by its own continuation (a shared prefix) and a new row."""
        for model_class in self.all_generative_model_classes:
            with self.subTest(model_class.__name__):
                model = self._referee_model(model_class)
                ids, mask = self._referee_prompts()
                sequences, _ = self._referee_check(model, ids, mask)
                continuation = sequences[:, -self.referee_new_tokens :]  # decoder-only: sequences = prompt + this
                longer = torch.cat([ids, continuation, ids[:, :3]], dim=1)
                longer_mask = torch.cat([mask, torch.ones(3, self.referee_new_tokens + 3, dtype=mask.dtype)], dim=1)
                self._referee_check(model, longer, longer_mask)
                self._referee_check(model, longer[:1, 2:], longer_mask[:1, 2:])  # the same text shifted: no prefix

    def test_referee_generate_matches_forward(self):
        """Logits of generate() (prefill + decode steps) equal one full forward over prompt + generated tokens."""
        for model_class in self.all_generative_model_classes:
            with self.subTest(model_class.__name__):
                model = self._referee_model(model_class)
                ids, mask = self._referee_prompts()
                self._referee_generate(model, ids, mask)  # fill a cache, if any
                sequences, logits = self._referee_generate(model, ids, mask)
                full_mask = torch.cat([mask, torch.ones(3, self.referee_new_tokens, dtype=mask.dtype)], dim=1)
                forward_kwargs = {"attention_mask": full_mask}
                if model.config.is_encoder_decoder:
                    self.skipTest("encoder-decoder: covered by the repeated/extended prompt checks")
                position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
                with torch.no_grad():
                    full = model(input_ids=sequences, position_ids=position_ids, **forward_kwargs).logits
                n = self.referee_new_tokens
                expected = full[:, -n - 1 : -1]
                torch.testing.assert_close(logits, expected, atol=self.referee_logits_atol, rtol=0)
