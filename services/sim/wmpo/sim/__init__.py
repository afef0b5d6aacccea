"""The real simulator (MetaWorld on MuJoCo, rendered offscreen on CPU), scripted experts, policy
sources, data collection and real evaluation. Needs the `sim` extra (``pip install 'wmpo[sim]'``)."""
