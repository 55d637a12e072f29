"""The crv service (HTTPS, mutual TLS): enrolment, blackboard, recipes, agent reports, admin."""
