"""Referee: transformers' ``ModelTesterMixin`` on tiny GPT2 models (see conftest.py)."""

import unittest

from referee_testers import GPT2Tester
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from transformers_upstream_tests.generation.test_utils import GenerationTesterMixin
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class GPT2RefereeTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification)

    def setUp(self):
        self.model_tester = GPT2Tester(self)
