"""Referee: transformers' ``ModelTesterMixin`` on tiny Llama models (see conftest.py)."""

import unittest

from referee_testers import LlamaTester
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers_upstream_tests.generation.test_utils import GenerationTesterMixin
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class LlamaRefereeTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification)

    def setUp(self):
        self.model_tester = LlamaTester(self)
