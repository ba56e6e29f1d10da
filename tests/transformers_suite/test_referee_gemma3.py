"""Referee: transformers' ``ModelTesterMixin`` on tiny Gemma3Text models (see conftest.py)."""

import unittest

from referee_testers import Gemma3TextTester
from transformers import Gemma3ForCausalLM, Gemma3TextModel
from transformers_upstream_tests.generation.test_utils import GenerationTesterMixin
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class Gemma3TextRefereeTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Gemma3TextModel, Gemma3ForCausalLM)

    def setUp(self):
        self.model_tester = Gemma3TextTester(self)
