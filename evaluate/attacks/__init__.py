"""The attack engines: what runs one batch of one attack (``engine``: the interface and the model view the
attacks call; ``reference``: pyautoattack itself; ``native``: our re-implementation; ``compiled``:
torch.compile around the model). They never import the runner, the reports or the CLIs."""
