"""Referee: transformers' ``ModelTesterMixin`` on tiny Roberta models (see conftest.py)."""

import unittest

from referee_testers import RobertaTester
from transformers import RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel
from transformers_upstream_tests.test_modeling_common import ModelTesterMixin


class RobertaRefereeTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RobertaModel, RobertaForSequenceClassification, RobertaForMaskedLM)

    def setUp(self):
        self.model_tester = RobertaTester(self)
