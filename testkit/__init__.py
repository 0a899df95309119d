"""What the tests (``tests/``) and the benchmarks (``benchmarks/``) share, so that neither imports the other.

* `testkit.netns`: network namespaces, veth pairs and bridges for real kernel frames;
* `testkit.wait`: the one polling helper (`until` on a loop, `wait_for` in a thread of its own);
* `testkit.gen_capture`: the generated IoT capture of the benchmarks (``python3 -m testkit.gen_capture``);
* `testkit.lab`: the attack lab (run by ``tests/lab`` and by ``benchmarks/detections.py``).
"""
