"""Stage 2: classifier learning on a frozen backbone (NCM, cRT, tau-norm, LWS, SRepr)."""
