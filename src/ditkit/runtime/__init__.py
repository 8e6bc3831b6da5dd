"""The runtime every stage stands on: files written atomically, folder locks, distributed set-up, compiled blocks,
seeding, input validation and the checks that refuse bad input with one line."""
