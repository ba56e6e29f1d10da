"""Referee: transformers' ``ModelTesterMixin`` on tiny Qwen2 models (see conftest.py)."""

import unittest

from referee_testers import Qwen2Tester
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers_upstream_tests.generation.test_utils import GenerationTesterMixin
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class Qwen2RefereeTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen2Model, Qwen2ForCausalLM)

    def setUp(self):
        self.model_tester = Qwen2Tester(self)
