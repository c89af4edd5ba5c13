"""The trainers' tests (rotkern.trainers); their shared helpers stay in tests/_trainer_helpers.py."""
