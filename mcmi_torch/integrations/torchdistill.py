"""Importing this module registers ``MCMILoss`` and ``MCMILossFromFile`` with torchdistill.

torchdistill's example scripts import every module listed under ``dependencies`` in a config
before they build the criterion, so a config only needs::

    dependencies:
      - name: 'mcmi_torch.integrations.torchdistill'
"""

from . import register_torchdistill

register_torchdistill()
