"""The operations guide's safeguards: Health Checker, Operation Guard, Manager Lock."""
