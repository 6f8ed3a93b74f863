"""Published reference values (Opacus and dp-accounting) for the Poisson-subsampled Gaussian:
(noise multiplier, sample rate, steps, delta, epsilon)."""

RDP_REFS = [(1.0, 0.01, 1000, 1e-5, 2.1014), (0.5, 0.01, 100, 1e-5, 8.0307)]
PRV_REFS = [(1.0, 0.01, 1000, 1e-5, 1.8384), (0.5, 0.01, 100, 1e-5, 6.4868)]
PLD_REFS = [(1.0, 0.01, 1000, 1e-5, 1.8282), (0.5, 0.01, 100, 1e-5, 6.4762)]
