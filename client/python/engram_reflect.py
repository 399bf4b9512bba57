#!/usr/bin/env python3
"""A grpcurl-style client driven by gRPC server reflection: list a server's
services, describe services, methods, messages and enums from the file
descriptors the server returns, and call any method with a JSON request.

  engram_reflect.py 127.0.0.1:50051 list
  engram_reflect.py 127.0.0.1:50051 list engram.v1.MemoryService
  engram_reflect.py 127.0.0.1:50051 describe engram.v1.MemoryService
  engram_reflect.py 127.0.0.1:50051 describe engram.v1.RetrieveRequest
  engram_reflect.py -d '{"name": "demo", "dim": 4, "kind": "STATE_KIND_CONTINUOUS"}' \\
      127.0.0.1:50051 engram.v1.MemoryService/CreateBank
  engram_reflect.py -d @ 127.0.0.1:50051 engram.v1.MemoryService/Store < store.json

Server-streaming methods print one JSON object per message. Symbols the
server's reflection does not describe (a C++ server serves grpc.health.v1
without a descriptor) come from .proto files compiled with protoc:

  engram_reflect.py --import-path proto --proto grpc/health/v1/health.proto \\
      127.0.0.1:50051 grpc.health.v1.Health/Check

Needs Debian's python3-grpcio and python3-protobuf (run with /usr/bin/python3)
and protoc (protobuf-compiler), which turns proto/grpc/reflection/v1alpha/
reflection.proto into Python on first use.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class ReflectError(Exception):
    pass


def load_reflection_messages(out_dir):
    """Compiles reflection.proto (once) and imports it under a private name:
    a generated package named "grpc" would shadow grpcio."""
    rel = os.path.join("grpc", "reflection", "v1alpha", "reflection.proto")
    path = os.path.join(out_dir, rel[: -len(".proto")] + "_pb2.py")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        subprocess.run(["protoc", "-I", PROTO_DIR, "--python_out", out_dir, rel], check=True)
    spec = importlib.util.spec_from_file_location("engram_reflect_reflection_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Reflection:
    """Resolves symbols through the server's reflection service (one stream,
    request by request) into a local DescriptorPool; extra FileDescriptorProtos
    (from --proto) fill in what the server does not describe."""

    def __init__(self, channel, refl_pb, metadata=(), timeout=10.0, extra_files=()):
        self.refl_pb = refl_pb
        self.call = channel.stream_stream(
            REFLECTION, request_serializer=refl_pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=refl_pb.ServerReflectionResponse.FromString)
        self.metadata = list(metadata)
        self.timeout = timeout
        self.pool = descriptor_pool.DescriptorPool()
        self.files = {}      # name -> FileDescriptorProto, received or extra
        self.added = set()   # names already in the pool
        self.extra = {f.name: f for f in extra_files}

    def _ask(self, **request):
        responses = self.call(iter([self.refl_pb.ServerReflectionRequest(**request)]),
                              metadata=self.metadata, timeout=self.timeout)
        response = next(iter(responses))
        kind = response.WhichOneof("message_response")
        if kind == "error_response":
            err = response.error_response
            code = next((c.name for c in grpc.StatusCode if c.value[0] == err.error_code),
                        str(err.error_code))
            what = next(iter(request.values()))
            raise ReflectError("%s: %s%s" % (code, err.error_message,
                                             " (%s)" % what if what else ""))
        return response

    def services(self):
        return sorted(s.name for s in self._ask(list_services="").list_services_response.service)

    def _receive(self, response):
        for raw in response.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            self.files.setdefault(fd.name, fd)

    def _add(self, name):
        """Adds file name and (first) its dependencies to the pool."""
        if name in self.added:
            return
        if name not in self.files:
            if name in self.extra:
                self.files[name] = self.extra[name]
            else:
                self._receive(self._ask(file_by_filename=name))
        fd = self.files[name]
        for dep in fd.dependency:
            self._add(dep)
        self.pool.Add(fd)
        self.added.add(name)

    def load_symbol(self, symbol):
        """Makes symbol (a fully-qualified service, method, message or enum)
        known to the pool: from the server, else from the extra files."""
        symbol = symbol.lstrip(".")
        try:
            self._find(symbol)
            return
        except KeyError:
            pass
        try:
            response = self._ask(file_containing_symbol=symbol)
        except ReflectError as server_error:
            name = self._extra_file_with(symbol)
            if name is None:
                raise ReflectError("%s\nThe server's reflection does not describe %s; pass the "
                                   ".proto that defines it with --proto (and --import-path)."
                                   % (server_error, symbol))
            self._add(name)
            return
        self._receive(response)
        for raw in response.file_descriptor_response.file_descriptor_proto[:1]:
            self._add(descriptor_pb2.FileDescriptorProto.FromString(raw).name)

    def _extra_file_with(self, symbol):
        for name, fd in self.extra.items():
            prefix = fd.package + "." if fd.package else ""
            names = set()
            for s in fd.service:
                names.add(prefix + s.name)
                names.update(prefix + s.name + "." + m.name for m in s.method)
            stack = [(prefix, m) for m in fd.message_type]
            while stack:
                p, m = stack.pop()
                names.add(p + m.name)
                names.update(p + m.name + "." + e.name for e in m.enum_type)
                stack += [(p + m.name + ".", n) for n in m.nested_type]
            names.update(prefix + e.name for e in fd.enum_type)
            if symbol in names:
                return name
        return None

    def _find(self, symbol):
        """(kind, descriptor) of a symbol already in the pool; KeyError if not."""
        for kind, find in (("service", self.pool.FindServiceByName),
                           ("message", self.pool.FindMessageTypeByName),
                           ("enum", self.pool.FindEnumTypeByName)):
            try:
                return kind, find(symbol)
            except KeyError:
                pass
        service, _, method = symbol.rpartition(".")
        if service:
            try:
                svc = self.pool.FindServiceByName(service)
            except KeyError:
                svc = None
            if svc is not None and method in svc.methods_by_name:
                return "method", svc.methods_by_name[method]
        raise KeyError(symbol)

    def resolve(self, symbol):
        symbol = symbol.lstrip(".")
        self.load_symbol(symbol)
        try:
            return self._find(symbol)
        except KeyError:
            raise ReflectError("symbol not found: " + symbol)

    def message_class(self, descriptor):
        return message_factory.MessageFactory(self.pool).GetPrototype(descriptor)


# ----------------------------------------------------------------- describe

_SCALARS = {v: k[len("TYPE_"):].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def _field_type(f, nested_maps):
    if f.type in (f.TYPE_MESSAGE, f.TYPE_ENUM, f.TYPE_GROUP):
        if f.type_name in nested_maps:
            key, value = nested_maps[f.type_name]
            return "map<%s, %s>" % (_field_type(key, {}), _field_type(value, {}))
        return f.type_name
    return _SCALARS[f.type]


def _render_message(m, scope, indent, proto2=False):
    pad = "  " * indent
    full = scope + "." + m.name
    nested_maps = {full + "." + n.name: (n.field[0], n.field[1])
                   for n in m.nested_type if n.options.map_entry}
    lines = [pad + "message %s {" % m.name]
    oneofs = {}
    for f in m.field:
        line = "%s = %d;" % (f.name, f.number)
        ftype = _field_type(f, nested_maps)
        if f.label == f.LABEL_REPEATED and not ftype.startswith("map<"):
            ftype = "repeated " + ftype
        elif f.label == f.LABEL_REQUIRED:
            ftype = "required " + ftype
        elif f.proto3_optional or (proto2 and not f.HasField("oneof_index")):
            ftype = "optional " + ftype
        text = "%s %s" % (ftype, line)
        if f.HasField("oneof_index") and not f.proto3_optional:
            oneofs.setdefault(f.oneof_index, []).append(text)
            if len(oneofs[f.oneof_index]) == 1:
                lines.append(("oneof", f.oneof_index))
        else:
            lines.append(pad + "  " + text)
    out = []
    for line in lines:
        if isinstance(line, tuple):
            out.append(pad + "  oneof %s {" % m.oneof_decl[line[1]].name)
            out += [pad + "    " + t for t in oneofs[line[1]]]
            out.append(pad + "  }")
        else:
            out.append(line)
    for n in m.nested_type:
        if not n.options.map_entry:
            out += _render_message(n, full, indent + 1, proto2)
    for e in m.enum_type:
        out += _render_enum(e, indent + 1)
    out.append(pad + "}")
    return out


def _render_enum(e, indent):
    pad = "  " * indent
    return ([pad + "enum %s {" % e.name]
            + [pad + "  %s = %d;" % (v.name, v.number) for v in e.value] + [pad + "}"])


def _render_method(m):
    return "rpc %s ( %s%s ) returns ( %s%s );" % (
        m.name, "stream " if m.client_streaming else "", m.input_type,
        "stream " if m.server_streaming else "", m.output_type)


def describe(kind, desc):
    """grpcurl-like text for a service, method, message or enum descriptor."""
    if kind == "service":
        proto = descriptor_pb2.ServiceDescriptorProto()
        desc.CopyToProto(proto)
        body = ["service %s {" % proto.name] + ["  " + _render_method(m) for m in proto.method]
        body.append("}")
    elif kind == "method":
        proto = descriptor_pb2.MethodDescriptorProto()
        desc.CopyToProto(proto)
        body = [_render_method(proto)]
    elif kind == "message":
        proto = descriptor_pb2.DescriptorProto()
        desc.CopyToProto(proto)
        scope = desc.full_name.rpartition(".")[0]
        body = _render_message(proto, "." + scope if scope else "", 0,
                               desc.file.syntax == "proto2")
    else:
        proto = descriptor_pb2.EnumDescriptorProto()
        desc.CopyToProto(proto)
        body = _render_enum(proto, 0)
    return "%s is %s %s:\n%s" % (desc.full_name, "an" if kind == "enum" else "a", kind,
                                "\n".join(body))


# --------------------------------------------------------------------- call

def invoke(channel, refl, method_name, data, metadata, timeout, emit_defaults):
    """Calls method_name ("pkg.Service/Method" or "pkg.Service.Method") with
    the JSON request(s) in data; yields each response as JSON text."""
    method_name = method_name.replace("/", ".")
    kind, method = refl.resolve(method_name)
    if kind != "method":
        raise ReflectError("%s is a %s, not a method" % (method_name, kind))
    proto = descriptor_pb2.MethodDescriptorProto()
    method.CopyToProto(proto)
    req_cls = refl.message_class(method.input_type)
    resp_cls = refl.message_class(method.output_type)
    requests = []
    decoder, text, pos = json.JSONDecoder(), data.strip() or "{}", 0
    while pos < len(text):  # several JSON objects for client streaming
        try:
            obj, end = decoder.raw_decode(text, pos)
            requests.append(json_format.ParseDict(obj, req_cls()))
        except (ValueError, json_format.ParseError) as e:
            raise ReflectError("bad JSON for %s: %s" % (method.input_type.full_name, e))
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
    path = "/%s/%s" % (method.containing_service.full_name, method.name)
    make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = make[(proto.client_streaming, proto.server_streaming)](
        path, request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString)
    if not proto.client_streaming:
        if len(requests) != 1:
            raise ReflectError("%s takes one request message, got %d" % (path, len(requests)))
        arg = requests[0]
    else:
        arg = iter(requests)
    result = stub(arg, metadata=metadata, timeout=timeout)
    responses = result if proto.server_streaming else [result]
    for r in responses:
        yield json_format.MessageToJson(r, preserving_proto_field_name=True,
                                        including_default_value_fields=emit_defaults)


def compile_protos(import_paths, protos):
    """FileDescriptorProtos of protos (and their imports), compiled by protoc."""
    if not protos:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        cmd = ["protoc", "--include_imports", "--descriptor_set_out", out]
        cmd += ["-I" + p for p in import_paths] + list(protos)
        subprocess.run(cmd, check=True)
        with open(out, "rb") as f:
            return list(descriptor_pb2.FileDescriptorSet.FromString(f.read()).file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("verb", help="list | describe | a method (pkg.Service/Method)")
    ap.add_argument("symbol", nargs="?", help="for list: a service; for describe: any symbol")
    ap.add_argument("-d", "--data", help="JSON request; '@' reads standard input")
    ap.add_argument("-H", "--header", action="append", default=[],
                    help="metadata 'name: value' (e.g. 'authorization: Bearer TOKEN')")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    ap.add_argument("--emit-defaults", action="store_true", help="print fields at default values")
    ap.add_argument("--import-path", action="append", default=[], help="for --proto")
    ap.add_argument("--proto", action="append", default=[],
                    help=".proto file describing symbols the server's reflection does not")
    ap.add_argument("--stubs", default=os.path.join(tempfile.gettempdir(), "engram_reflect_stubs"),
                    help="where the reflection messages are generated")
    args = ap.parse_args(argv)

    metadata = []
    for h in args.header:
        name, _, value = h.partition(":")
        metadata.append((name.strip().lower(), value.strip()))
    if os.environ.get("ENGRAM_TOKEN") and not any(k == "authorization" for k, _ in metadata):
        metadata.append(("authorization", "Bearer " + os.environ["ENGRAM_TOKEN"]))

    refl_pb = load_reflection_messages(args.stubs)
    extra = compile_protos(args.import_path or [PROTO_DIR], args.proto)
    with grpc.insecure_channel(args.target) as channel:
        refl = Reflection(channel, refl_pb, metadata, args.timeout, extra)
        try:
            if args.verb == "list":
                if args.symbol is None:
                    print("\n".join(refl.services()))
                else:
                    kind, svc = refl.resolve(args.symbol)
                    if kind != "service":
                        raise ReflectError("%s is a %s, not a service" % (args.symbol, kind))
                    print("\n".join(m.full_name for m in svc.methods))
            elif args.verb == "describe":
                if args.symbol is None:
                    for name in refl.services():
                        try:
                            print(describe(*refl.resolve(name)))
                        except ReflectError as e:
                            print("%s: %s" % (name, str(e).splitlines()[0]))
                else:
                    print(describe(*refl.resolve(args.symbol)))
            else:
                data = sys.stdin.read() if args.data == "@" else (args.data or "{}")
                for text in invoke(channel, refl, args.verb, data, metadata, args.timeout,
                                   args.emit_defaults):
                    print(text)
        except ReflectError as e:
            print("error: %s" % e, file=sys.stderr)
            return 1
        except grpc.RpcError as e:
            print("ERROR:\n  Code: %s\n  Message: %s" % (e.code().name, e.details()),
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
