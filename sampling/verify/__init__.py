"""Verifiers: the target checks the drafts in one pass and keeps the output law its own
(``rules``: the accept/reject rule, the residual, the tree walk; ``chain``; ``tree``)."""
