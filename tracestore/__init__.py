"""The trace format, the ground floor both phases import: the schema (tables, roles, manifest), the store
(reading and writing parts, object storage), the writers' lock, atomic writes, validation and repair, grade
sets, the rules for where outputs may land, and the error every layer raises for input a user can fix."""
