"""Applications of the library, apart from its stages: the demo, the papers' experiments and the reports.

They drive the stages (data, cache, train, evaluate) through their public functions and the files those
write, as a user would; nothing in the stages imports from here.
"""
