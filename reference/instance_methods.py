"""Functions set on one object as if they were its methods, without a reference cycle.

A bound method kept in an object's own `__dict__` (`module.forward = types.MethodType(f, module)`) refers
back to the object, so a dropped model would live until the cyclic garbage collector runs, keeping its
(device) memory until then. These hold the object weakly instead, as transformers' own models are freed
at once when the last reference goes.
"""

from __future__ import annotations

import inspect
import weakref


def weakly_bound(function, instance, **kwargs):
    """`function(instance, *args, **kwargs)`, to set as an attribute of `instance`; its signature is the
    function's without the first parameter and the bound keywords, as a bound method's would be."""
    instance_ref = weakref.ref(instance)

    def bound(*args, **more):
        return function(instance_ref(), *args, **kwargs, **more)

    bound.__name__, bound.__qualname__, bound.__doc__ = function.__name__, function.__qualname__, function.__doc__
    signature = inspect.signature(function)
    parameters = [p for p in list(signature.parameters.values())[1:] if p.name not in kwargs]
    bound.__signature__ = signature.replace(parameters=parameters)
    return bound
