// The JSON string escaper and the listening socket of the front end (serve/wire.h).
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "aimass/error.h"
#include "serve/wire.h"

namespace aimass::serve::wire {

namespace {
// Length (1-4) and code point of the well-formed UTF-8 sequence at s[i], or 0 when it is not one
// (a stray continuation byte, a bad lead, a cut-short, overlong or surrogate sequence, past U+10FFFF).
size_t utf8_at(std::string_view s, size_t i, unsigned& cp) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n;
  unsigned min;
  if (c >= 0xc2 && c <= 0xdf) n = 2, cp = c & 0x1f, min = 0x80;
  else if (c >= 0xe0 && c <= 0xef) n = 3, cp = c & 0x0f, min = 0x800;
  else if (c >= 0xf0 && c <= 0xf4) n = 4, cp = c & 0x07, min = 0x10000;
  else return 0;
  if (s.size() - i < n) return 0;
  for (size_t k = 1; k < n; ++k) {
    unsigned char d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (d & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}
}  // namespace

void json_escape(std::string& out, std::string_view s, bool ascii_only) {
  auto u = [&](unsigned v) {
    char b[8];
    std::snprintf(b, sizeof b, "\\u%04x", v);
    out += b;
  };
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || (c == 0x7f && ascii_only)) u(c);
          else out += static_cast<char>(c);
      }
      continue;
    }
    unsigned cp = 0;
    size_t n = utf8_at(s, i, cp);
    if (n == 0) {  // not UTF-8: the replacement character, then on at the next byte
      if (ascii_only) u(0xfffd);
      else out += "\xef\xbf\xbd";
      continue;
    }
    if (!ascii_only) {
      out.append(s.data() + i, n);
    } else if (cp >= 0x10000) {
      cp -= 0x10000;
      u(0xd800 + (cp >> 10));
      u(0xdc00 + (cp & 0x3ff));
    } else {
      u(cp);
    }
    i += n - 1;
  }
}

int listen_on(const std::string& host_in, int port, int backlog, const char* who, int& bound_port) {
  const std::string host = host_in == "localhost" ? "127.0.0.1" : host_in;
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_PASSIVE;
  int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  AIMASS_CHECK(rc == 0 && res, ValueError, who, ": host '", host_in, "' is not a numeric address");
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  bool ok = fd >= 0 && ::bind(fd, res->ai_addr, res->ai_addrlen) == 0 && ::listen(fd, backlog) == 0;
  int err = errno;
  ::freeaddrinfo(res);
  if (!ok && fd >= 0) ::close(fd);
  AIMASS_CHECK(ok, IOError, who, ": cannot listen on ", host_in, ":", port, ": ", std::strerror(err));
  sockaddr_storage addr{};
  socklen_t alen = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &alen);
  bound_port = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                                : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd;
}

}  // namespace aimass::serve::wire
